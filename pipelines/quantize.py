"""`qconv quantize`: calibrate -> kv-params -> awq -> convert in one go, skipping finished stages."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .. import QconvError
from ..convert.fileio import load_json
from ..convert.kv_mode import mode_problem
from ..convert.model_io import model_shape, read_config
from ..convert.shards import INDEX, SINGLE
from ..convert.sizes import DEFAULT_SHARD_BYTES
from .awq import AwqRequest, awq
from .calibrate import CalibRequest, calibrate
from .kv_params import kv_params


def _awq_done(ckpt: Path, req: AwqRequest, calib: CalibRequest) -> bool:
    """A finished checkpoint from the same request (its awq.json says so)."""
    if not (ckpt / "awq.json").is_file() or not ((ckpt / SINGLE).is_file() or (ckpt / INDEX).is_file()):
        return False
    rep = load_json(ckpt / "awq.json", "AWQ report")
    return rep.get("request") == asdict(req) and rep.get("calib") == asdict(calib)


def quantize(model: str, dst: str, work_dir: str | None, req: AwqRequest, calib: CalibRequest, kv: bool = True,
             kv_sym: bool = False, session_len: int | None = None, device: str = "auto", dtype: str = "auto",
             force: bool = False, trust_remote_code: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES,
             log=print, kv_mode: str | None = None, max_host_bytes: int | None = None) -> Path:
    """``kv_mode`` (convert/kv_mode.py) None: int8-static with ``kv``, else fp16. int8-static calibrates K/V for its
    params, int4 for its K centers (the calibrate work dir goes to convert); the others take no statistics.
    ``max_host_bytes`` (--max-host-memory) caps calibrate's and awq's host memory."""
    from ..convert.workspace import ConvertRequest, convert_workspace

    dst_path = Path(dst)
    work = Path(work_dir) if work_dir else dst_path.with_name(dst_path.name + ".work")
    if (dst_path / "config.ini").is_file() and not force:
        log(f"qconv: {dst_path} already holds a workspace; skipping (pass --force to rebuild it)")
        return dst_path
    if dst_path.exists() and not force:
        raise QconvError(f"{dst_path} exists and is not a workspace; pass --force or choose another --dst-path")
    common = dict(device=device, dtype=dtype, trust_remote_code=trust_remote_code, max_host_bytes=max_host_bytes)
    params, kv_mode = None, kv_mode or ("int8-static" if kv else "fp16")
    problem = mode_problem(kv_mode, model_shape(read_config(model, trust_remote_code)[1])["head_dim"])
    if problem:  # before hours of calibration and AWQ, not at convert
        raise QconvError(problem)
    if kv_mode in ("int8-static", "int4"):
        log("qconv: [1/4] calibrate")
        calibrate(model, str(work), calib, force=force, log=log, **common)
        params = str(work)
    if kv_mode == "int8-static":
        log("qconv: [2/4] kv-params")
        params = str(kv_params(str(work), sym=kv_sym, log=lambda *_: None))
    ckpt = work / "awq_checkpoint"
    if _awq_done(ckpt, req, calib) and not force:
        log(f"qconv: [3/4] awq: {ckpt} is up to date; skipping")
    else:
        log("qconv: [3/4] awq")
        awq(model, str(work), req, calib, force=True if ckpt.exists() else force, shard_bytes=shard_bytes, log=log,
            **common)
    log("qconv: [4/4] convert")
    out = convert_workspace(ConvertRequest(model=str(ckpt), dst=str(dst_path), kv_params=params,
                                           kv_mode=kv_mode, session_len=session_len, force=force,
                                           trust_remote_code=trust_remote_code), log=log)
    log(f"qconv: workspace ready in {out}. Next: qconv chat {out}")
    return out
