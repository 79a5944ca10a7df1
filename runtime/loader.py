"""Load a workspace: config.ini, manifest check, weights, tokenizer, KV params.

On CUDA with triton (fp16/bf16) the model is runtime/cuda/model.py's GpuTransformer with int4 weights kept
int4 (runtime/cuda/linear.py); elsewhere runtime/cpu/model.py's Transformer (int4 through torch's CPU kernel
or dequantized once, int8 dequantized once).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import QconvError
from ..convert.arch import get_arch
from ..convert.fileio import load_tensors
from ..convert.kv_file import CENTER_FILE, KV_FILE, load_k_centers, load_kv_params
from ..convert.layout import (ATTN_NORM, EMBED, FFN_NORM, FINAL_NORM, FUSED_LINEARS, GLOBAL_FILE, K_NORM, OUTPUT,
                              Q_NORM, QuantLinear, interleave_pairs, layer_file, read_linear)
from ..convert.manifest import verify_manifest
from ..convert.model_io import load_tokenizer, quiet_transformers, resolve_device, resolve_dtype
from ..convert.quant import group_qparams, kv_rotation, quantize
from ..convert.workspace_config import CONFIG_FILE, WorkspaceConfig
from .cpu.runner import CpuRunner
from .cuda.model import GpuTransformer, use_gpu_path
from .cuda.runner import CudaRunner
from .kv_cache import KVCache
from .options import RuntimeOptions
from .runner import Runner
from .cpu.linear import make_linear
from .cpu.model import Transformer


@dataclass(slots=True)
class LoadedWorkspace:
    path: Path
    cfg: WorkspaceConfig
    model: Transformer
    tokenizer: object
    kv_qparams: dict[int, tuple[torch.Tensor, ...]] | None  # {layer: (k_scale, k_zp, v_scale, v_zp)}, int8-static
    device: torch.device
    dtype: torch.dtype
    kv_transform: dict = field(default_factory=dict)  # KVCache's rot, k_centers, sink (online modes)


def is_workspace(path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_FILE).is_file()


def read_workspace_config(path) -> WorkspaceConfig:
    ws = Path(path)
    if not ws.is_dir():
        raise QconvError(f"workspace {ws} does not exist; create one with qconv convert --model M --dst-path {ws}")
    if not (ws / CONFIG_FILE).is_file():
        raise QconvError(f"{ws} is not a qconv workspace (no config.ini); create one with "
                         f"qconv convert --model M --dst-path {ws}")
    return WorkspaceConfig.read(ws / CONFIG_FILE)


def runtime_dtype(dtype: str, device: torch.device, cfg: WorkspaceConfig) -> torch.dtype:
    """``auto``: as for models (float32 on CPU; bf16 or float16 on GPU), except that int4 workspaces on the
    CPU compute in bfloat16, the one dtype torch's CPU int4 kernel is fast with (about twice float32's
    decode rate). ``qconv eval`` asks for float32 explicitly."""
    if (dtype == "auto" and device.type == "cpu" and cfg.weight_type == "int4"
            and hasattr(torch, "_weight_int4pack_mm_for_cpu")):
        return torch.bfloat16
    return resolve_dtype(dtype, device, "bfloat16" if cfg.weight_type == "bf16" else None)


def load_workspace(path, opts: RuntimeOptions = RuntimeOptions(), max_len: int | None = None) -> LoadedWorkspace:
    """Read a workspace and build its model for ``opts.device``. ``max_len``: rotary table length (default
    session_len). ``opts.gpu_path``: build runtime/cuda/model.py's model (None: on CUDA with triton; True
    elsewhere only makes sense under TRITON_INTERPRET=1, for tests). ``opts.head``: the output projection as the
    workspace holds it ("fp"), or quantized at load, round to nearest: "int8" (one scale per vocabulary row; the
    CPU path computes with the same values, dequantized) or "int4" (groups of up to 128, GPU path only). "auto":
    int8 on the GPU path for an int4 workspace, else fp. The head is the largest matrix a small model reads per
    token."""
    head, verify = opts.head, opts.verify
    ws = Path(path)
    cfg = read_workspace_config(ws)
    if verify:
        verify_manifest(ws)
    dev = resolve_device(opts.device)
    dt = runtime_dtype(opts.dtype, dev, cfg)
    kv = None
    if cfg.kv_mode == "int8-static":
        if not (ws / KV_FILE).is_file():
            raise QconvError(f"{ws / CONFIG_FILE} has quant_policy=4 but there is no {KV_FILE}; install params "
                             f"with qconv kv-params --work-dir W --workspace {ws}")
        kv = load_kv_params(ws / KV_FILE, cfg.num_layer, cfg.kv_head_num)
    transform = _kv_transform(ws, cfg)

    # [STEP 1]: embeddings, final norm, output head
    name = f"weights/{GLOBAL_FILE}"
    t = load_tensors(ws / name, "workspace weights")
    V, H = cfg.vocab_size, cfg.hidden_units
    glob = {EMBED: _tensor(t, EMBED, (V, H), name), FINAL_NORM: _tensor(t, FINAL_NORM, (H,), name)}
    if not cfg.tie_word_embeddings:
        glob[OUTPUT] = _tensor(t, OUTPUT, (V, H), name)
    glob = {k: v.to(dev, dt) for k, v in glob.items()}

    # [STEP 2]: decoder layers, one file each, and the model for the device
    gpu = use_gpu_path(dev, dt, cfg) if opts.gpu_path is None else opts.gpu_path
    if gpu and cfg.kv_transform.sink > 16:  # (use_gpu_path leaves such a workspace to the torch model)
        raise QconvError(f"the GPU path keeps at most 16 KV sink positions, {ws / CONFIG_FILE} has kv_sink "
                         f"{cfg.kv_sink}; run without forcing the GPU path, or convert again")
    if head == "auto":
        head = "int8" if gpu and cfg.weight_type == "int4" else "fp"
    if head == "int4" and not gpu:
        raise QconvError("an int4 head needs the GPU path (CUDA with triton); use head int8 or fp")
    if head == "int8":
        codes, scales = _rows_int8(_head_weight(glob))
        if not gpu:  # the CPU model computes with the int8 head's values
            glob[OUTPUT] = (codes.to(scales.dtype) * scales[:, None]).to(dt)
    if gpu:
        from .cuda.linear import DequantScratch, Int8Head, make_gpu_linear

        scratch = DequantScratch(dev, dt)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
        gpu_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None  # its kernel config table

        def build(w, bias, weight_type, lin=None):
            if lin == "feed_forward.w13":  # gate/up rows in pairs: the kernels' SiLU-mul epilogue reads them so
                w = interleave_pairs(w)
            return make_gpu_linear(w, bias, weight_type, dev, dt, scratch, sms, gpu_name)
    else:
        def build(w, bias, weight_type, lin=None):
            return make_linear(w, bias, weight_type, dev, dt)
    layers = []
    for i in range(cfg.num_layer):
        name = f"weights/{layer_file(i)}"
        layers.append(_layer_params(cfg, load_tensors(ws / name, "workspace weights"), name, dev, dt, build))
    if gpu:
        lm = {"fp": lambda: None, "int4": lambda: _int4_head(glob, cfg, build),
              "int8": lambda: Int8Head(codes, scales, dt)}[head]()
        model = GpuTransformer(cfg, glob, layers, max_len or cfg.session_len, lm).eval()
    else:
        model = Transformer(cfg, glob, layers, max_len or cfg.session_len).eval()

    # [STEP 3]: tokenizer and chat template
    quiet_transformers()
    try:
        tok = load_tokenizer(ws / "tokenizer")
    except (OSError, ValueError) as e:
        raise QconvError(f"the tokenizer in {ws / 'tokenizer'} cannot be loaded ({str(e).splitlines()[0]})") from None
    return LoadedWorkspace(ws, cfg, model, tok, kv, dev, dt, transform)


def _kv_transform(ws: Path, cfg: WorkspaceConfig) -> dict:
    """The online cache's transform (config.ini's kv_rotation, kv_sink, kv_k_center) as KVCache's arguments."""
    t = cfg.kv_transform
    if t.identity:
        return {}
    centers = None
    if t.k_center:
        if not (ws / CENTER_FILE).is_file():
            raise QconvError(f"{ws / CONFIG_FILE} has kv_k_center = true but there is no {CENTER_FILE}; convert the "
                             f"workspace again with --kv int4 --kv-params W (a calibrate work dir)")
        centers = load_k_centers(ws / CENTER_FILE, cfg.num_layer, cfg.kv_head_num, cfg.size_per_head)
    rot = kv_rotation(cfg.size_per_head) if t.rotation == "hadamard" else None
    return {"rot": rot, "k_centers": centers, "sink": t.sink}


def _head_weight(glob: dict) -> torch.Tensor:
    """The output projection's weight for requantizing: an untied head leaves ``glob`` (its quantized form
    replaces it); a tied one is the embedding table, which stays."""
    return glob.pop(OUTPUT) if OUTPUT in glob else glob[EMBED]


def _rows_int8(w: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """w [V, H] -> (codes int8 [V, H], scales float32 [V]): symmetric, one scale per row (absmax / 127),
    round to nearest; in chunks of rows, so the float32 copy stays small."""
    codes = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], chunk):
        part = w[r:r + chunk].float()
        scale, zero = group_qparams(part, 8, 0, sym=True)  # [rows, 1]
        codes[r:r + chunk] = quantize(part, scale, zero, 8, sym=True).to(torch.int8)
        scales[r:r + chunk] = scale[:, 0]
    return codes, scales


def _int4_head(glob: dict, cfg: WorkspaceConfig, build):
    """The output projection (or the tied embedding) as int4 codes: RTN with the largest power-of-two group
    <= 128 that divides hidden; an untied fp16 head is dropped from ``glob``."""
    w = _head_weight(glob)
    group = next((g for g in (128, 64, 32) if cfg.hidden_units % g == 0), None)
    if group is None:
        raise QconvError(f"an int4 head needs hidden_units ({cfg.hidden_units}) divisible by 32")
    scale, zero = group_qparams(w.float(), 4, group)  # on the device: [V, H/g]
    return build(QuantLinear(quantize(w.float(), scale, zero, 4), scale, zero), None, "int4")


def _linear_shapes(cfg: WorkspaceConfig) -> dict[str, tuple[int, int]]:
    H, I, D = cfg.hidden_units, cfg.inter_size, cfg.size_per_head
    return {"attention.wqkv": ((cfg.head_num + 2 * cfg.kv_head_num) * D, H), "attention.wo": (H, cfg.head_num * D),
            "feed_forward.w13": (2 * I, H), "feed_forward.w2": (H, I)}


def _layer_params(cfg: WorkspaceConfig, t: dict, name: str, dev, dt, build) -> dict:
    """Norm weights on the device, and the four linears made by ``build(w, bias, weight_type)``."""
    H, D = cfg.hidden_units, cfg.size_per_head
    p = {ATTN_NORM: _tensor(t, ATTN_NORM, (H,), name), FFN_NORM: _tensor(t, FFN_NORM, (H,), name)}
    if get_arch(cfg.model_arch).q_norm is not None:
        p[Q_NORM], p[K_NORM] = _tensor(t, Q_NORM, (D,), name), _tensor(t, K_NORM, (D,), name)
    p = {k: v.to(dev, dt) for k, v in p.items()}
    if cfg.attn_bias != ("attention.wqkv.bias" in t):
        raise QconvError(f"{name}: config.ini says attn_bias={str(cfg.attn_bias).lower()} but the q/k/v bias is "
                         f"{'missing' if cfg.attn_bias else 'present'}")
    for lin, (out_f, in_f) in _linear_shapes(cfg).items():
        assert lin in FUSED_LINEARS
        parts = {k[len(lin) + 1:]: v for k, v in t.items() if k.startswith(lin + ".") and not k.endswith(".bias")}
        try:
            w = read_linear(parts, cfg.weight_type)
            if isinstance(w, QuantLinear):
                _check_quant(w, cfg, lin, name)
        except (KeyError, ValueError, RuntimeError) as e:
            raise QconvError(f"{name}: the tensors of {lin} ({', '.join(sorted(parts)) or 'none'}) do not form a "
                             f"{cfg.weight_type} linear ({e}); recreate the workspace") from None
        shape = tuple(w.codes.shape if isinstance(w, QuantLinear) else w.shape)
        if shape != (out_f, in_f):
            raise QconvError(f"{name}: {lin} is {list(shape)}, config.ini implies [{out_f}, {in_f}]")
        bias = _tensor(t, f"{lin}.bias", (out_f,), name) if f"{lin}.bias" in t else None
        p[lin] = build(w, bias, cfg.weight_type, lin)
    return p


def _check_quant(w: QuantLinear, cfg: WorkspaceConfig, lin: str, name: str) -> None:
    out_f, in_f = w.codes.shape
    groups = in_f // cfg.group_size if cfg.group_size > 0 else 1
    if tuple(w.scale.shape) != (out_f, groups) or w.zero.shape != w.scale.shape:
        raise QconvError(f"{name}: {lin} has scales {list(w.scale.shape)} for codes {list(w.codes.shape)}; with "
                         f"{cfg.weight_type} and group_size {cfg.group_size} they should be [{out_f}, {groups}]")


def _tensor(t: dict, key: str, shape: tuple, name: str) -> torch.Tensor:
    if key not in t:
        raise QconvError(f"workspace file {name} has no tensor {key!r}; recreate the workspace with qconv convert")
    if tuple(t[key].shape) != shape:
        raise QconvError(f"workspace file {name}: {key} is {list(t[key].shape)}, config.ini implies {list(shape)}")
    return t[key]


def make_runner(model, cache: KVCache, opts: RuntimeOptions) -> Runner:
    """The runner for the model the loader built: the one place that tells the two paths apart."""
    return CudaRunner(model, cache, opts) if isinstance(model, GpuTransformer) else CpuRunner(model, cache)
