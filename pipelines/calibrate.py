"""`qconv calibrate`: per-channel statistics of every linear input, and per-head K/V ranges.

Outputs in the work dir (all safetensors, all written atomically):
  inputs_stats.safetensors  "{linear}.{max|min|mean|absmax|absmean}"   each [in_features]
  key_stats.safetensors     "layers.{i}.{min|max|absmax|mean}"          each [kv_heads, head_dim] (K after rotary;
                                                                         mean over the positions after the first)
  value_stats.safetensors   likewise for V
  calibrate.json            what was run, on which model, how long it took
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .. import QconvError, __version__
from ..convert.fileio import load_json, save_json, save_tensors
from ..convert.memory import peaks, reset_peaks
from ..convert.model_io import fingerprint, load_model, model_shape, resolve_device
from .data import calib_windows, load_texts
from .hooks import KVObserver, attention_function, observe_linear_inputs
from .layerwise import Layerwise, iter_blocks
from .stats import kv_stats

OUTPUTS = ("inputs_stats.safetensors", "key_stats.safetensors", "value_stats.safetensors", "calibrate.json")


@dataclass(slots=True)
class CalibRequest:
    dataset: str = "c4"
    samples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self):
        if self.samples <= 0:
            raise QconvError(f"--calib-samples must be positive, got {self.samples}")
        if self.seqlen <= 0:
            raise QconvError(f"--calib-seqlen must be positive, got {self.seqlen}")


def default_batch_size(device: torch.device, seqlen: int, gpu_tokens: int = 16384) -> int:
    # About 16k tokens a batch on a GPU keeps the matmuls large; on a CPU one window at a time is as fast.
    return max(1, gpu_tokens // seqlen) if device.type == "cuda" else 1


def existing_run(work_dir: Path, fp: str, req: CalibRequest, force: bool) -> dict | None:
    """The previous run's record if it matches this request exactly and all outputs exist."""
    meta_path = work_dir / "calibrate.json"
    if not meta_path.exists() or force:
        return None
    meta = load_json(meta_path, "calibration record")
    if meta.get("fingerprint") != fp:
        raise QconvError(f"{work_dir} holds statistics of a different model ({meta.get('model')}); "
                         f"use another --work-dir or pass --force to overwrite them")
    if meta.get("request") != asdict(req):
        raise QconvError(f"{work_dir} holds statistics from other settings {meta.get('request')}; "
                         f"pass --force to recompute them or use another --work-dir")
    if all((work_dir / f).is_file() for f in OUTPUTS):
        return meta
    return None


def calibrate(model: str, work_dir: str, req: CalibRequest = CalibRequest(), batch_size: int | None = None,
              device: str = "auto", dtype: str = "auto", force: bool = False, trust_remote_code: bool = False,
              max_host_bytes: int | None = None, log=print) -> dict:
    """``max_host_bytes`` (--max-host-memory) caps the host memory the stage plans on (convert/memory.host_limit):
    two streamed blocks must fit it, and hidden states that do not fit half of it spill to disk."""
    work = Path(work_dir)
    dev = resolve_device(device)
    reset_peaks(dev)  # the record's peaks cover this stage only, loading included
    lm = load_model(model, dtype=dtype, device=str(dev), trust_remote_code=trust_remote_code,
                    max_host_bytes=max_host_bytes)
    fp = fingerprint(lm)
    done = existing_run(work, fp, req, force)
    if done is not None:
        log(f"qconv: {work} already holds these statistics; skipping (pass --force to recompute)")
        return done

    ids = calib_windows(load_texts(req.dataset), lm.tokenizer, req.samples, req.seqlen, req.seed, log=log)
    bs = batch_size or default_batch_size(dev, req.seqlen)
    t0 = time.perf_counter()
    run = Layerwise(lm, ids, dev, bs, spill_dir=work, max_host_bytes=max_host_bytes)
    inputs, kv = {}, KVObserver()
    layers = lm.layers
    # The bar counts tokens through the whole model (a layer's batch is 1/L of its tokens' work), so its rate
    # is the summary line's: tokens / wall.
    bar = tqdm(total=run.tokens, unit="tok", unit_scale=True, desc="calibrate", dynamic_ncols=True)
    advance = lambda n: bar.update(n / len(layers))  # noqa: E731
    side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    per_layer = []  # stats stay on the device until the end: no host sync between layers
    with attention_function(lm.model, kv):
        for i, layer in iter_blocks(lm, dev):
            bar.set_description(f"calibrate layer {i + 1}/{len(layers)}")
            store: dict = {}
            with observe_linear_inputs(layer, lm.spec, store, side):
                run.run_block(layer, on_batch=advance)
            per_layer.append(store)
    bar.close()
    run.close()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    for i, store in enumerate(per_layer):
        for group in lm.spec.input_groups:
            stats = store[group[0]].finalize()
            for name in group:
                for stat, t in stats.items():
                    inputs[f"{lm.spec.layers}.{i}.{name}.{stat}"] = t.clone()
    wall = time.perf_counter() - t0

    key = {f"layers.{i}.{k}": v for i, mm in sorted(kv.key.items())
           for k, v in {**kv_stats(mm), **kv.key_mean(i)}.items()}
    value = {f"layers.{i}.{k}": v for i, mm in sorted(kv.value.items()) for k, v in kv_stats(mm).items()}
    meta = {
        "qconv_version": __version__,
        "model": lm.source,
        "fingerprint": fp,
        "shape": model_shape(lm.config),
        "request": asdict(req),
        "tokens": run.tokens,
        "windows": run.n,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": str(dev),
        "batch_size": bs,
        "hidden_states": run.placement,
        "max_host_bytes": max_host_bytes,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(run.tokens / wall, 1),
        **peaks(dev),
    }
    tag = {"fingerprint": fp}
    (work / "calibrate.json").unlink(missing_ok=True)  # no stale record beside half-replaced stats
    save_tensors(inputs, work / "inputs_stats.safetensors", tag)
    save_tensors(key, work / "key_stats.safetensors", tag)
    save_tensors(value, work / "value_stats.safetensors", tag)
    save_json(meta, work / "calibrate.json")  # last: its presence marks a complete run
    log(f"qconv: calibrated {run.tokens} tokens in {wall:.1f}s ({meta['tokens_per_s']:.0f} tok/s); "
        f"stats in {work}. Next: qconv kv-params --work-dir {work}")
    return meta
