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
from .awq_export import is_quantized_checkpoint, load_dequantized
from .fileio import atomic_dir

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
    model: torch.nn.Module
    tokenizer: object
    spec: ArchSpec
    path: Path  # the HF folder actually loaded (the GGUF cache for .gguf inputs)
    source: str  # what the user passed

    @property
    def config(self):
        return self.model.config

    @property
    def layers(self):
        return get_module(self.model, self.spec.layers)


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    h = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{h}"


def gguf_to_hf(gguf: Path) -> Path:
    """Dequantize a GGUF file into an HF folder once; return the cached folder."""
    out = _gguf_cache_dir(gguf)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _  # noqa: F401  (transformers needs it; say so plainly)
    except ImportError:
        raise QconvError("loading .gguf files needs the 'gguf' package: pip install gguf") from None
    quiet_transformers()
    print(f"qconv: converting {gguf.name} to an HF folder once (cached in {out})")
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    get_arch(model.config.model_type)
    # The weights are now plain dequantized tensors: drop the GGUF marker so they save as a normal model.
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(tmp)
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
               attn_implementation: str = "sdpa") -> LoadedModel:
    """Load on CPU in the resolved dtype; callers move what they need (layer by layer)."""
    from transformers import AutoModelForCausalLM

    folder, config, spec = read_config(path, trust_remote_code)
    torch_dtype = resolve_dtype(dtype, resolve_device(device), getattr(config, "dtype", None))
    quiet_transformers()
    if is_quantized_checkpoint(folder):  # AWQ / int8: dequantize into a float model
        model = load_dequantized(folder, config, spec, torch_dtype)
        return LoadedModel(model, load_tokenizer(folder, trust_remote_code), spec, folder, str(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch_dtype, trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation)
    except (OSError, ValueError) as e:
        raise QconvError(f"could not load the model in {folder}: {str(e).splitlines()[0]}") from None
    model.eval().requires_grad_(False)
    return LoadedModel(model, load_tokenizer(folder, trust_remote_code), spec, folder, str(path))


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
    emb = get_module(lm.model, lm.spec.embed).weight
    h.update(emb[:8].detach().to(torch.float16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
