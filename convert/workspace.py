"""Deployment workspace: config.ini + weights/ + tokenizer/ + kv_qparams.safetensors + manifest.json."""
from __future__ import annotations

from pathlib import Path

from .. import QconvError


def install_kv_params(workspace, params_path) -> None:
    ws = Path(workspace)
    if not (ws / "config.ini").is_file():
        raise QconvError(f"workspace {ws} not found (no config.ini); create one with qconv convert first")
    raise QconvError("installing KV params into a workspace arrives with qconv convert")
