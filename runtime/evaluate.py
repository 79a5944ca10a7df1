"""`qconv eval`: perplexity of a workspace through the bundled runtime, by the same protocol as `qconv eval --model`
(convert/perplexity.py), and the choice between the two."""
from __future__ import annotations

from .. import QconvError
from ..convert.model_io import resolve_device
from ..convert.perplexity import PplResult, eval_windows, perplexity
from ..pipelines.data import eval_text
from ..pipelines.eval import eval_model
from .engine import Engine
from .loader import is_workspace, read_workspace_config


def evaluate(model: str, dataset: str, seqlen: int = 2048, windows: int | None = None,
             kv_params: str | None = None, kv_sym: bool = False, kv_granularity: str = "head",
             device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
             head: str = "auto", kv_mode: str | None = None) -> PplResult:
    """A workspace (a folder with config.ini) through the bundled runtime, anything else through transformers
    (pipelines/eval.py). ``head`` (workspaces only): the output projection's format, see
    runtime/loader.load_workspace."""
    if is_workspace(model):  # a qconv convert workspace: through the bundled runtime
        return eval_workspace(model, dataset, seqlen, windows, kv_params, device, dtype, head=head, kv_mode=kv_mode)
    if head != "auto":
        raise QconvError(f"--lm-head applies to workspaces; {model} is not one (no config.ini)")
    return eval_model(model, dataset, seqlen, windows, kv_params, kv_sym, kv_granularity, device, dtype,
                      trust_remote_code, kv_mode)


def eval_workspace(workspace: str, dataset: str, seqlen: int = 2048, windows: int | None = None,
                   kv_params: str | None = None, device: str = "auto", dtype: str = "auto",
                   verify: bool = True, head: str = "auto", kv_mode: str | None = None) -> PplResult:
    """Windows are prefilled from position 0 through the engine's KV cache, so a quantized KV workspace is
    measured with K and V read back from its cache. ``kv_mode``: None, or what config.ini says (a check)."""
    if kv_params is not None:
        raise QconvError(f"--kv-params does not apply to a workspace: its config.ini quant_policy decides; "
                         f"install params with qconv kv-params --work-dir W --workspace {workspace}")
    if kv_mode is not None and kv_mode != read_workspace_config(workspace).kv_mode:
        raise QconvError(f"--kv {kv_mode} does not apply to a workspace: its config.ini says kv_mode "
                         f"{read_workspace_config(workspace).kv_mode}; convert another one with --kv {kv_mode}")
    text = eval_text(dataset)
    if dtype == "auto" and resolve_device(device).type == "cpu":
        dtype = "float32"  # perplexity on the CPU is measured in float32 (BENCH_PROTOCOL), not chat's bf16
    engine = Engine.from_workspace(workspace, device=device, dtype=dtype, verify=verify, head=head)
    ids = eval_windows(text, engine.tokenizer, seqlen, windows)
    if seqlen > engine.cfg.session_len:
        raise QconvError(f"--seqlen {seqlen} is longer than the workspace's session_len {engine.cfg.session_len}")
    desc = "eval workspace" + (f" kv-{engine.cfg.kv_mode}" if engine.cfg.kv_mode != "fp16" else "")
    return perplexity(engine.logits, ids, engine.device, desc=desc)
