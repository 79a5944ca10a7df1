"""Model loading: a local HF folder (config.json + safetensors) or a ``.gguf`` file.

A GGUF file is dequantized by transformers once and cached as an HF folder under
``$QCONV_CACHE`` (default ``~/.cache/qconv``), so later loads take seconds.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import QconvError
from .arch import ArchSpec, get_arch, get_module
from .awq_export import is_quantized_checkpoint
from .fileio import atomic_dir
from .memory import check_two_blocks_fit
from .weights import StreamedWeights, expected_shapes

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def quiet_transformers() -> None:
    """qconv shows its own progress; transformers' per-load bars and warnings only add noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cache_root() -> Path:
    return Path(os.environ.get("QCONV_CACHE", Path.home() / ".cache" / "qconv"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QconvError("--device cuda was given but no CUDA device is available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, config_dtype=None) -> torch.dtype:
    """auto: float32 on CPU; on GPU the checkpoint's bf16 if it is bf16, else float16."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if str(config_dtype).endswith("bfloat16") else torch.float16


@dataclass(slots=True)
class LoadedModel:
    """A model for the block-by-block stages. Streamed (``weights`` set): a meta-device skeleton whose
    tensors are read from disk when a stage asks (``fill_block``, ``tensor``, ``embed_rows``). Resident
    (``weights`` None): every tensor in host memory, as transformers' from_pretrained loads it."""

    model: torch.nn.Module
    tokenizer: object
    spec: ArchSpec
    path: Path  # the HF folder actually loaded (the GGUF cache for .gguf inputs)
    source: str  # what the user passed
    weights: StreamedWeights | None = None

    @property
    def config(self):
        return self.model.config

    @property
    def layers(self):
        return get_module(self.model, self.spec.layers)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _stored_name(self, name: str) -> str:
        tied = getattr(self.config, "tie_word_embeddings", False)
        return f"{self.spec.embed}.weight" if tied and name == f"{self.spec.lm_head}.weight" else name

    def tensor(self, name: str) -> torch.Tensor:
        """A whole-model tensor (embedding, final norm, head) in the compute dtype, read when asked."""
        if self.weights is None:
            return self.model.get_parameter(name).detach()
        return self.weights.get(self._stored_name(name))

    def embed_rows(self, ids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Embedding rows of the sorted distinct ``ids`` [U] -> [U, H], read ``chunk`` rows at a time."""
        name = f"{self.spec.embed}.weight"
        if self.weights is None:
            return self.model.get_parameter(name).detach()[ids]
        parts = []
        for start in range(0, int(ids.max()) + 1, chunk):
            sel = ids[(ids >= start) & (ids < start + chunk)]
            if sel.numel():
                parts.append(self.weights.rows(name, start, start + chunk)[sel - start])
        return torch.cat(parts)

    def fill_block(self, i: int) -> torch.nn.Module:
        if self.weights is not None:
            self.weights.fill(self.layers[i], f"{self.spec.layers}.{i}.")
        return self.layers[i]

    def drop_block(self, i: int) -> None:
        if self.weights is not None:
            self.weights.drop(self.layers[i])

    def materialize(self) -> None:
        """Read every tensor (for stages that run the whole model at once)."""
        if self.weights is None:
            return
        for i in range(len(self.layers)):
            self.fill_block(i)
        for path in (self.spec.embed, self.spec.final_norm):
            self.weights.fill(get_module(self.model, path), path + ".")
        if getattr(self.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        else:
            self.weights.fill(get_module(self.model, self.spec.lm_head), self.spec.lm_head + ".")
        self.weights = None


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    h = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{h}"


def gguf_to_hf(gguf: Path) -> Path:
    """Dequantize a GGUF file into an HF folder once, one tensor at a time; return the cached folder."""
    out = _gguf_cache_dir(gguf)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        import gguf as _  # noqa: F401  (transformers needs it; say so plainly)
    except ImportError:
        raise QconvError("loading .gguf files needs the 'gguf' package: pip install gguf") from None
    from .gguf_stream import write_hf_weights

    quiet_transformers()
    print(f"qconv: converting {gguf.name} to an HF folder once (cached in {out})")
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    get_arch(config.model_type)
    config.dtype = torch.float32  # the weights are dequantized to float32
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with atomic_dir(out, force=True) as tmp:
        write_hf_weights(gguf, tmp, config)
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def read_config(path: str | os.PathLike, trust_remote_code: bool = False):
    """Validate the model path and return (hf_folder, config, spec)."""
    from transformers import AutoConfig

    src = Path(path)
    if not src.exists():
        raise QconvError(f"model path {src} does not exist; pass an HF folder (config.json + safetensors) or a .gguf file")
    if src.is_file():
        if src.suffix != ".gguf":
            raise QconvError(f"{src} is a file but not a .gguf; pass an HF folder or a .gguf file")
        src = gguf_to_hf(src)
    elif not (src / "config.json").is_file():
        raise QconvError(f"{src} has no config.json; pass an HF model folder (config.json + safetensors) or a .gguf file")
    try:
        raw = json.loads((src / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise QconvError(f"{src / 'config.json'} is not valid JSON ({e})") from None
    spec = get_arch(raw.get("model_type"))
    config = AutoConfig.from_pretrained(str(src), trust_remote_code=trust_remote_code)
    return src, config, spec


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


def load_model(path, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False,
               attn_implementation: str = "sdpa", stream: bool = True,
               max_host_bytes: int | None = None) -> LoadedModel:
    """The model in the resolved dtype. ``stream``: a skeleton whose tensors stay on disk until a block's
    turn (the default); else every tensor in host memory through from_pretrained. Callers move what they
    need to the device, block by block. ``max_host_bytes`` (--max-host-memory) caps the host memory that
    streaming plans on: two blocks must fit it."""
    folder, config, spec = read_config(path, trust_remote_code)
    torch_dtype = resolve_dtype(dtype, resolve_device(device), getattr(config, "dtype", None))
    quiet_transformers()
    qcfg = is_quantized_checkpoint(folder)  # AWQ / int8: linears dequantized as they are read
    if stream or qcfg:
        lm = _streamed(folder, config, spec, torch_dtype, qcfg, trust_remote_code, attn_implementation, str(path),
                       max_host_bytes)
        if not stream:
            lm.materialize()
        return lm
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch_dtype, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation)
    except (OSError, ValueError) as e:
        raise QconvError(f"could not load the model in {folder}: {str(e).splitlines()[0]}") from None
    model.eval().requires_grad_(False)
    return LoadedModel(model, load_tokenizer(folder, trust_remote_code), spec, folder, str(path))


def skeleton(config, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
             attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The model's modules on the meta device: every shape config.json implies, no storage."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code,
                                                attn_implementation=attn_implementation)


def _streamed(folder: Path, config, spec: ArchSpec, dtype: torch.dtype, qcfg, trust_remote_code: bool,
              attn_implementation: str, source: str, max_host_bytes: int | None = None) -> LoadedModel:
    if qcfg:  # the skeleton is a plain float model
        config = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    model = skeleton(config, dtype, trust_remote_code, attn_implementation)
    block = get_module(model, spec.layers)[0]
    check_two_blocks_fit(sum(p.numel() * p.element_size() for p in block.parameters()), dtype, max_host_bytes)
    weights = StreamedWeights(folder, dtype, qcfg)
    weights.check(expected_shapes(model), optional={f"{spec.lm_head}.weight"}
                  if getattr(config, "tie_word_embeddings", False) else set())
    # The rotary module's buffers are computed, not stored: build it again on the CPU.
    parent, attr = spec.rotary.rsplit(".", 1)
    setattr(get_module(model, parent), attr, type(get_module(model, spec.rotary))(config))
    model.eval().requires_grad_(False)
    return LoadedModel(model, load_tokenizer(folder, trust_remote_code), spec, folder, source, weights)


def model_shape(config) -> dict:
    """The config fields that fix every tensor shape qconv writes."""
    heads = config.num_attention_heads
    return {
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "vocab_size": config.vocab_size,
    }


def fingerprint(lm: LoadedModel) -> str:
    """Hash of the shape fields plus a slice of the embedding, rounded to fp16 so the dtype does not matter."""
    h = hashlib.sha256(json.dumps(model_shape(lm.config), sort_keys=True).encode())
    emb = lm.embed_rows(torch.arange(8))
    h.update(emb.to(torch.float16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
