"""``manifest.json``: the size and sha256 of every file of a workspace, checked before loading.

  {"format": "qconv-workspace", "version": 1,
   "files": {"config.ini": {"size": 1234, "sha256": "..."}, "weights/layers.0.safetensors": {...}, ...}}
"""
from __future__ import annotations

from pathlib import Path

from .. import QconvError
from .fileio import load_json, save_json, sha256_file

MANIFEST = "manifest.json"
FORMAT, VERSION = "qconv-workspace", 1


def file_entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(root) -> None:
    """List every regular file under ``root`` (except the manifest itself), sorted by path."""
    root = Path(root)
    files = {p.relative_to(root).as_posix(): file_entry(p) for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}
    save_json({"format": FORMAT, "version": VERSION, "files": files}, root / MANIFEST)


def update_manifest(root, *names: str) -> None:
    """Refresh the entries of ``names`` (paths relative to ``root``) after they were rewritten."""
    root = Path(root)
    manifest = read_manifest(root)
    for name in names:
        manifest["files"][name] = file_entry(root / name)
    save_json(manifest, root / MANIFEST)


def read_manifest(root) -> dict:
    root = Path(root)
    manifest = load_json(root / MANIFEST, "workspace manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"),
                                                                                           dict):
        raise QconvError(f"{root / MANIFEST} is not a qconv workspace manifest; recreate the workspace with "
                         f"qconv convert")
    return manifest


def verify_manifest(root) -> None:
    """Every listed file exists with its size and sha256; the first mismatch is a one-line error naming it."""
    root = Path(root)
    hint = "recreate the workspace with qconv convert, or pass --no-verify to load it anyway"
    for name, entry in read_manifest(root)["files"].items():
        path = root / name
        if not path.is_file():
            raise QconvError(f"workspace file {name} is missing from {root}; {hint}")
        size = path.stat().st_size
        if size != entry["size"]:
            raise QconvError(f"workspace file {name} is truncated or resized: {size} bytes, the manifest says "
                             f"{entry['size']}; {hint}")
        if sha256_file(path) != entry["sha256"]:
            raise QconvError(f"workspace file {name} was altered (sha256 differs from the manifest); {hint}")
