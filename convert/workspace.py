"""`qconv convert`: a deployment workspace for the bundled runtime.

  DST/config.ini               the [llama] schema of convert/workspace_config.py (the only source of truth)
  DST/weights/*.safetensors    the runtime layout of convert/layout.py (q/k/v and gate/up fused)
  DST/tokenizer/               tokenizer, chat template, generation_config.json
  DST/kv_qparams.safetensors   int8 KV params (only with --kv-params / qconv kv-params --workspace)
  DST/convert.json             what was converted, wall time, peak host RSS (convert/memory.py)
  DST/kv_center.safetensors    int4 KV: K centers (only with --kv int4 --kv-params, a calibrate work dir)
  DST/manifest.json            size and sha256 of every file
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import QconvError, __version__
from .checkpoint import FORMATS, Checkpoint, detect_format, quant_group_size
from .fileio import atomic_dir, atomic_path, check_new_path, load_json, save_json, save_tensors
from .kv_file import CENTER_FILE, KV_FILE, k_center_tensors, load_k_centers, load_kv_params
from .kv_mode import KV_MODES, new_transform, policy_of_mode
from .layout import (ATTN_NORM, EMBED, FFN_NORM, FINAL_NORM, FLOAT_DTYPES, FUSED_LINEARS, GLOBAL_FILE, K_NORM,
                     OUTPUT, Q_NORM, WEIGHT_TYPES, QuantLinear, fuse, layer_file, linear_tensors)
from .manifest import update_manifest, write_manifest
from .memory import peaks, reset_peaks
from .model_io import load_tokenizer, model_shape, read_config, skeleton
from .weights import expected_shapes
from .quant import group_qparams, quantize
from .workspace_config import CONFIG_FILE, WorkspaceConfig
from .rope import rope_fields

DEFAULT_GROUP_SIZE = 128
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(slots=True)
class ConvertRequest:
    model: str
    dst: str
    model_format: str | None = None  # None: from config.json's quantization_config
    weight_type: str = "auto"        # auto: the source's float dtype (hf), int4 (awq, gptq), int8 (w8)
    group_size: int | None = None    # int4/int8 from float weights (round-to-nearest); None: 128 / per channel
    kv_params: str | None = None     # int8-static: a kv_qparams.safetensors; int4: a calibrate work dir (K centers)
    quant_policy: int | None = None  # None: 4 with kv_params, else 0
    session_len: int | None = None   # None: max_position_embeddings
    max_batch_size: int = 1
    force: bool = False
    trust_remote_code: bool = False
    kv_mode: str | None = None       # convert/kv_mode.py's KV_MODES; None: as quant_policy (int8-static with kv_params)

    def __post_init__(self):
        if self.model_format is not None and self.model_format not in FORMATS:
            raise QconvError(f"--model-format must be one of {', '.join(FORMATS)}, got {self.model_format!r}")
        if self.weight_type not in ("auto",) + WEIGHT_TYPES:
            raise QconvError(f"--weight-type must be auto or one of {', '.join(WEIGHT_TYPES)}")
        if self.quant_policy not in (None, 0, 4):
            raise QconvError(f"--quant-policy must be 0 (fp KV) or 4 (int8 KV), got {self.quant_policy}")
        if self.kv_mode is not None and self.kv_mode not in KV_MODES:
            raise QconvError(f"--kv must be one of {', '.join(KV_MODES)}, got {self.kv_mode!r}")
        if self.kv_mode is not None and self.quant_policy is not None \
                and self.quant_policy != policy_of_mode(self.kv_mode):
            raise QconvError(f"--quant-policy {self.quant_policy} contradicts --kv {self.kv_mode} (quant_policy 4 is "
                             f"calibrated static int8, --kv int8-static); give only --kv")
        if self.kv_mode is None:
            self.kv_mode = "int8-static" if self.quant_policy == 4 or (
                self.quant_policy is None and self.kv_params is not None) else "fp16"
        if self.kv_mode == "int8-static" and self.kv_params is None:
            raise QconvError("--quant-policy 4 / --kv int8-static (calibrated int8 KV cache) needs --kv-params "
                             "W/kv_qparams.safetensors; compute them with qconv calibrate and qconv kv-params, or "
                             "use --kv int8 (online, no calibration)")
        if self.kv_mode not in ("int8-static", "int4") and self.kv_params is not None:
            raise QconvError(f"--kv-params applies to --kv int8-static (its params) and --kv int4 (a calibrate work "
                             f"dir, for K centers), not --kv {self.kv_mode} (its params are taken as tokens are "
                             f"written); drop one of them")
        if self.group_size is not None and self.group_size <= 0:
            raise QconvError(f"--group-size must be positive, got {self.group_size}")
        if self.session_len is not None and self.session_len < 2:
            raise QconvError(f"--session-len must be at least 2, got {self.session_len}")
        if self.max_batch_size < 1:
            raise QconvError(f"--max-batch-size must be at least 1, got {self.max_batch_size}")
        check_new_path(self.dst, self.force)


def source_name(model) -> str:
    """The name a workspace shows (config.ini's model_name, /v1/models, the chat banner): the model the user
    started from. A qconv AWQ checkpoint names its source in awq.json, so a quantized workspace is called after
    that model, not after its intermediate folder (awq_checkpoint)."""
    path = Path(model)
    report = path / "awq.json"
    if path.is_dir() and report.is_file():
        source = load_json(report, "AWQ report").get("model")
        if isinstance(source, str) and source:
            return source_name(source)
    name = path.resolve().name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def convert_workspace(req: ConvertRequest, log=print, checkpoint=None) -> Path:
    """``checkpoint``: what reads the source's tensors (convert/checkpoint.Checkpoint's get, linear and bias);
    default the safetensors files of req.model."""
    reset_peaks(torch.device("cpu"))  # convert.json's peak covers this stage only
    t0 = time.perf_counter()
    # [STEP 1]: the source checkpoint and its format
    folder, config, spec = read_config(req.model, req.trust_remote_code)
    raw = json.loads((folder / "config.json").read_text())
    fmt = req.model_format or detect_format(raw)
    src_group = None if fmt == "hf" else quant_group_size(raw, fmt)
    weight_type, group = _weight_type(req, fmt, src_group, config)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise QconvError(f"hidden_act {config.hidden_act!r} is not supported by the bundled runtime (silu only)")
    float_dtype = _float_dtype(weight_type, config)

    # [STEP 2]: the config.ini schema
    shape = model_shape(config)
    tok = load_tokenizer(folder, req.trust_remote_code)
    kv = load_kv_params(req.kv_params, shape["num_layers"], shape["num_kv_heads"]) \
        if req.kv_params and req.kv_mode == "int8-static" else None
    centers = load_k_centers(req.kv_params, shape["num_layers"], shape["num_kv_heads"], shape["head_dim"]) \
        if req.kv_params and req.kv_mode == "int4" else None
    transform = new_transform(req.kv_mode, centers is not None)
    cfg = WorkspaceConfig(
        model_name=source_name(req.model),
        model_arch=spec.model_type, head_num=shape["num_heads"], kv_head_num=shape["num_kv_heads"],
        size_per_head=shape["head_dim"], hidden_units=shape["hidden_size"], inter_size=shape["intermediate_size"],
        num_layer=shape["num_layers"], vocab_size=shape["vocab_size"], norm_eps=float(config.rms_norm_eps),
        **rope_fields(config), max_position_embeddings=int(config.max_position_embeddings),
        attn_bias=bool(getattr(config, "attention_bias", spec.qkv_bias)),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        weight_type=weight_type, group_size=group,
        quant_policy=policy_of_mode(req.kv_mode), kv_mode=req.kv_mode, kv_rotation=transform.rotation,
        kv_sink=transform.sink, kv_k_center=transform.k_center,
        kv_sym=bool(kv) and all(not p[1].any() and not p[3].any() for p in kv.values()),
        session_len=req.session_len or int(config.max_position_embeddings), max_batch_size=req.max_batch_size,
        start_id=_first_id(raw.get("bos_token_id"), tok.bos_token_id), end_id=_stop_ids(raw, folder, tok),
        cache_max_entry_count=0.8, tensor_para_size=1)

    if checkpoint is None:
        ckpt = Checkpoint(folder, fmt)
        cfg_float = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
        ckpt.shards.check_shapes(expected_shapes(skeleton(cfg_float, trust_remote_code=req.trust_remote_code)))
    else:
        ckpt = checkpoint
    H, I, D = cfg.hidden_units, cfg.inter_size, cfg.size_per_head
    out_in = {"q_proj": (cfg.head_num * D, H), "k_proj": (cfg.kv_head_num * D, H), "v_proj": (cfg.kv_head_num * D, H),
              "o_proj": (H, cfg.head_num * D), "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    with atomic_dir(req.dst, force=req.force) as tmp:
        # [STEP 3]: weights, one layer file at a time
        for i in range(cfg.num_layer):
            pre = f"{spec.layers}.{i}."
            t = {ATTN_NORM: ckpt.get(pre + spec.input_norm + ".weight"),
                 FFN_NORM: ckpt.get(pre + spec.post_attn_norm + ".weight")}
            if spec.q_norm:
                t[Q_NORM], t[K_NORM] = ckpt.get(pre + spec.q_norm + ".weight"), ckpt.get(pre + spec.k_norm + ".weight")
            for name, attrs in FUSED_LINEARS.items():
                parts = [_as_weight_type(ckpt.linear(pre + getattr(spec, a), *out_in[a]), weight_type, group,
                                         float_dtype) for a in attrs]
                for suffix, tensor in linear_tensors(fuse(parts, float_dtype), weight_type).items():
                    t[f"{name}.{suffix}"] = tensor
                biases = [ckpt.bias(pre + getattr(spec, a)) for a in attrs]
                if any(b is not None for b in biases):  # [out] each; a missing one is zero
                    t[f"{name}.bias"] = torch.cat([torch.zeros(out_in[a][0]) if b is None else b.float()
                                                   for a, b in zip(attrs, biases)])
            if cfg.attn_bias != ("attention.wqkv.bias" in t):
                raise QconvError(f"config.json says attention_bias={cfg.attn_bias} but layer {i}'s q/k/v "
                                 f"{'have no' if cfg.attn_bias else 'have'} bias tensors")
            save_tensors(_floats_to(t, float_dtype), tmp / "weights" / layer_file(i))
        log(f"qconv: wrote {cfg.num_layer} layers ({weight_type}{f', group {group}' if group else ''})")
        g = {EMBED: ckpt.get(spec.embed + ".weight"), FINAL_NORM: ckpt.get(spec.final_norm + ".weight")}
        if not cfg.tie_word_embeddings:
            head = ckpt.linear(spec.lm_head, cfg.vocab_size, H)
            g[OUTPUT] = head.dequantize() if isinstance(head, QuantLinear) else head
        save_tensors(_floats_to(g, float_dtype), tmp / "weights" / GLOBAL_FILE)

        # [STEP 4]: tokenizer, chat template, generation config
        tok.save_pretrained(str(tmp / "tokenizer"))
        if (folder / "generation_config.json").is_file():
            shutil.copyfile(folder / "generation_config.json", tmp / "tokenizer" / "generation_config.json")

        # [STEP 5]: KV params, config.ini, the stage record, manifest
        if kv is not None:
            shutil.copyfile(req.kv_params, tmp / KV_FILE)
        if centers is not None:
            save_tensors(k_center_tensors(centers), tmp / CENTER_FILE)
        cfg.write(tmp / CONFIG_FILE)
        save_json({"qconv_version": __version__, "model": req.model, "weight_type": weight_type, "group_size": group,
                   "kv_mode": cfg.kv_mode, "wall_s": round(time.perf_counter() - t0, 3),
                   **peaks(torch.device("cpu"))}, tmp / "convert.json")
        write_manifest(tmp)
    log(f"qconv: wrote workspace {req.dst} (kv_mode={cfg.kv_mode}, quant_policy={cfg.quant_policy}, "
        f"session_len={cfg.session_len})")
    return Path(req.dst)


def install_kv_params(workspace, params_path) -> None:
    """Copy int8 KV params into a workspace (checking they fit), set kv_mode int8-static (quant_policy=4), update the
    manifest."""
    ws = Path(workspace)
    if not (ws / CONFIG_FILE).is_file():
        raise QconvError(f"workspace {ws} not found (no config.ini); create one with qconv convert first")
    cfg = WorkspaceConfig.read(ws / CONFIG_FILE)
    params = load_kv_params(params_path, cfg.num_layer, cfg.kv_head_num)
    sym = all(not p[1].any() and not p[3].any() for p in params.values())  # zp = 0 everywhere
    with atomic_path(ws / KV_FILE) as tmp:
        shutil.copyfile(params_path, tmp)
    cfg.replace(quant_policy=4, kv_mode="int8-static", kv_sym=sym).write(ws / CONFIG_FILE)
    update_manifest(ws, KV_FILE, CONFIG_FILE)


# ----------------------------------------------------------------------------------------------
def _weight_type(req: ConvertRequest, fmt: str, src_group: int | None, config) -> tuple[str, int]:
    """(weight_type, group_size). Float sources may become any type (int4/int8 by round-to-nearest);
    a quantized source keeps its type and group size, or is dequantized to a float type."""
    if fmt == "hf":
        wt = _DTYPE_NAMES.get(_source_dtype(config), "fp16") if req.weight_type == "auto" else req.weight_type
        default = DEFAULT_GROUP_SIZE if wt == "int4" else 0  # int8: per output channel unless asked
        return wt, (req.group_size or default) if wt in ("int4", "int8") else 0
    native = "int8" if fmt == "w8" else "int4"
    wt = native if req.weight_type == "auto" else req.weight_type
    if wt in ("int4", "int8") and wt != native:
        raise QconvError(f"--weight-type {wt} from an {native} {fmt.upper()} checkpoint is not supported; "
                         f"keep {native} or dequantize to fp16/bf16/fp32")
    if req.group_size is not None and req.group_size != src_group:
        raise QconvError(f"--group-size {req.group_size} differs from the checkpoint's group size {src_group}; "
                         f"an {fmt.upper()} checkpoint keeps its own")
    return wt, src_group if wt == native else 0


def _source_dtype(config) -> torch.dtype:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
        str(d).replace("torch.", ""), torch.float16)


def _float_dtype(weight_type: str, config) -> torch.dtype:
    """Dtype of every float tensor: the weight type's, or for int4/int8 the source's fp16/bf16 (else fp16)."""
    if weight_type in FLOAT_DTYPES:
        return FLOAT_DTYPES[weight_type]
    src = _source_dtype(config)
    return src if src in (torch.float16, torch.bfloat16) else torch.float16


def _as_weight_type(w, weight_type: str, group: int, float_dtype: torch.dtype):
    """A source linear (float or int4 codes) in the workspace's weight type."""
    if isinstance(w, QuantLinear):
        return w if weight_type in ("int4", "int8") else w.dequantize().to(float_dtype)
    if weight_type not in ("int4", "int8"):
        return w.to(float_dtype)
    bits, sym = (4, False) if weight_type == "int4" else (8, True)  # group 0: one scale per output channel
    scale, zero = group_qparams(w, bits, group, sym)
    scale = scale.to(torch.float16).float()  # the stored precision, so codes and scales agree
    return QuantLinear(quantize(w, scale, zero, bits, sym), scale, zero)


def _floats_to(t: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Norms, embeddings and biases in the workspace float dtype; quantized tensors untouched."""
    return {k: v.to(dtype) if v.is_floating_point() and not k.endswith(".scales") else v for k, v in t.items()}


def _first_id(*candidates) -> int:
    for c in candidates:
        if isinstance(c, list):
            c = c[0] if c else None
        if c is not None:
            return int(c)
    return -1


def _stop_ids(raw: dict, folder: Path, tok) -> tuple[int, ...]:
    """Every eos id of config.json, generation_config.json and the tokenizer, in that order."""
    gen = folder / "generation_config.json"
    sources = [raw.get("eos_token_id"), json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None,
               tok.eos_token_id]
    ids: list[int] = []
    for s in sources:
        for x in s if isinstance(s, list) else [s]:
            if x is not None and int(x) not in ids:
                ids.append(int(x))
    if not ids:
        raise QconvError(f"{folder} names no eos token (config.json, generation_config.json, tokenizer); "
                         f"the runtime needs at least one stop id")
    return tuple(ids)
