"""`qconv kv-params`: int8 K/V zero-points and scales from the calibrated K/V ranges.

  kv_qparams.safetensors  "layers.{i}.{k_scale|k_zp|v_scale|v_zp}"  each [kv_heads] float32
                          (per-layer granularity stores the shard's value repeated for its heads)
  kv_qparams.json         settings, per-layer ranges and the stage's peak host RSS, for people
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import QconvError
from ..convert.fileio import load_json, load_tensors, save_json, save_tensors
from ..convert.memory import peaks, reset_peaks
from ..convert.quant import kv_qparams, kv_reduce
from ..convert.workspace import install_kv_params

GRANULARITIES = ("head", "layer")


def load_kv_stats(work: Path) -> tuple[dict, dict, dict]:
    """(calibrate.json, key stats, value stats), checked against each other."""
    meta_path = work / "calibrate.json"
    if not meta_path.is_file():
        raise QconvError(f"no calibration statistics in {work}; run qconv calibrate --model M --work-dir {work} first")
    meta = load_json(meta_path, "calibration record")
    shape = meta["shape"]
    L, H, D = shape["num_layers"], shape["num_kv_heads"], shape["head_dim"]
    stats = []
    for kind in ("key", "value"):
        path = work / f"{kind}_stats.safetensors"
        t = load_tensors(path, f"{kind} statistics")
        for i in range(L):
            for s in ("min", "max"):
                got = t.get(f"layers.{i}.{s}")
                if got is None or tuple(got.shape) != (H, D):
                    raise QconvError(
                        f"{path} does not match the model in calibrate.json ({L} layers of [{H}, {D}]): "
                        f"layers.{i}.{s} is {None if got is None else list(got.shape)}; it comes from a different "
                        f"model, so rerun qconv calibrate --force")
        stats.append(t)
    return meta, stats[0], stats[1]


def compute_kv_params(key: dict, value: dict, num_layers: int, sym: bool, granularity: str,
                      num_tp: int) -> dict[str, torch.Tensor]:
    if granularity not in GRANULARITIES:
        raise QconvError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    heads = key["layers.0.min"].shape[0]
    if num_tp <= 0 or heads % num_tp:
        raise QconvError(f"--num-tp {num_tp} does not divide the {heads} KV heads; pick a divisor of {heads}")
    out = {}
    for i in range(num_layers):
        for tag, stats in (("k", key), ("v", value)):
            lo, hi, amax = kv_reduce(stats[f"layers.{i}.min"], stats[f"layers.{i}.max"], granularity, num_tp)
            scale, zp = kv_qparams(lo, hi, amax, sym)
            out[f"layers.{i}.{tag}_scale"], out[f"layers.{i}.{tag}_zp"] = scale, zp
    return out


def kv_params(work_dir: str, sym: bool = False, granularity: str = "head", num_tp: int = 1,
              workspace: str | None = None, log=print) -> Path:
    work = Path(work_dir)
    if not work.is_dir():
        raise QconvError(f"work dir {work} not found; run qconv calibrate --model M --work-dir {work} first")
    reset_peaks(torch.device("cpu"))  # the record's peak covers this stage only
    meta, key, value = load_kv_stats(work)
    L = meta["shape"]["num_layers"]
    params = compute_kv_params(key, value, L, sym, granularity, num_tp)
    settings = {"sym": sym, "granularity": granularity, "num_tp": num_tp, "fingerprint": meta["fingerprint"]}
    out = work / "kv_qparams.safetensors"
    save_tensors(params, out, {k: str(v) for k, v in settings.items()})
    rows = []
    for i in range(L):
        rows.append({
            "layer": i,
            "k_min": float(key[f"layers.{i}.min"].min()), "k_max": float(key[f"layers.{i}.max"].max()),
            "v_min": float(value[f"layers.{i}.min"].min()), "v_max": float(value[f"layers.{i}.max"].max()),
        })
    save_json({**settings, "model": meta["model"], **peaks(torch.device("cpu")), "layers": rows},
              work / "kv_qparams.json")
    log(f"{'layer':>5} {'K min':>9} {'K max':>9} {'V min':>9} {'V max':>9}")
    for r in rows:
        log(f"{r['layer']:>5} {r['k_min']:>9.3f} {r['k_max']:>9.3f} {r['v_min']:>9.3f} {r['v_max']:>9.3f}")
    log(f"qconv: wrote {out} ({'sym' if sym else 'asym'}, per {granularity}, num_tp={num_tp})")
    if workspace is not None:
        install_kv_params(workspace, out)
        log(f"qconv: installed into {workspace} and set quant_policy=4")
    return out
