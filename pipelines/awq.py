"""`qconv awq`: activation-aware weight quantization (W4A16 g128 by default) into an HF AWQ checkpoint.

Work dir layout:
  W/awq_state/state.json            the request and model fingerprint the cached blocks belong to
  W/awq_state/block_NNN.safetensors  each finished block's scales and clips (resume point)
  W/awq_checkpoint/ (or --out)       the checkpoint: config.json, weights (model.safetensors, or shards
                                     and model.safetensors.index.json), tokenizer, awq.json

The checkpoint's weights are written block by block into a temp folder that replaces the output only
when the run completes; a resumed run replays the saved blocks and writes the same bytes.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from .. import QconvError, __version__
from ..convert.arch import get_module
from ..convert.awq_export import quantization_config, write_checkpoint_files
from ..convert.fileio import atomic_dir, load_json, load_tensors, save_json, save_tensors
from ..convert.memory import peaks, reset_peaks
from ..convert.model_io import LoadedModel, fingerprint, load_model, resolve_device
from ..convert.shards import ShardWriter
from ..convert.sizes import DEFAULT_SHARD_BYTES
from .awq_block import capture_inputs, pack_block, replay_block, search_block
from .awq_request import AwqRequest
from .calibrate import CalibRequest, default_batch_size
from .data import calib_windows, load_texts
from .layerwise import Layerwise, iter_blocks


def check_group_size(lm: LoadedModel, group_size: int) -> None:
    if group_size <= 0:
        return
    block = lm.layers[0]
    in_features = {name: get_module(block, name).in_features for name in lm.spec.linears}
    for name, in_f in in_features.items():
        if in_f % group_size:
            valid = [g for g in (32, 64, 128, 256) if all(f % g == 0 for f in in_features.values())]
            raise QconvError(f"--w-group-size {group_size} does not divide {name}.in_features={in_f}; valid "
                             f"group sizes for this model: {', '.join(map(str, valid)) or 'none of 32/64/128/256'}")


def _state_dir(work: Path, lm: LoadedModel, req: AwqRequest, calib: CalibRequest, force: bool) -> Path:
    """The resume cache; one that belongs to other settings is refused (or wiped with --force)."""
    state = work / "awq_state"
    want = {"fingerprint": fingerprint(lm), "awq": asdict(req), "calib": asdict(calib)}
    if force:  # recompute everything
        shutil.rmtree(state, ignore_errors=True)
    elif (state / "state.json").is_file() and load_json(state / "state.json", "AWQ resume state") != want:
        raise QconvError(f"{state} holds a run with other settings or another model; pass --force to "
                         f"discard it, or use another --work-dir")
    state.mkdir(parents=True, exist_ok=True)
    save_json(want, state / "state.json")
    return state


def awq(model: str, work_dir: str, req: AwqRequest = AwqRequest(), calib: CalibRequest = CalibRequest(seqlen=512),
        out: str | None = None, batch_size: int | None = None, device: str = "auto", dtype: str = "auto",
        force: bool = False, trust_remote_code: bool = False, backend: str = "native",
        shard_bytes: int = DEFAULT_SHARD_BYTES, max_host_bytes: int | None = None, log=print) -> Path:
    """``shard_bytes`` (--shard-size): most bytes per checkpoint shard. ``max_host_bytes`` (--max-host-memory):
    the host memory the stage plans on, as in calibrate."""
    work = Path(work_dir)
    dst = Path(out) if out else work / "awq_checkpoint"
    if dst.exists() and not force:
        raise QconvError(f"{dst} already exists; pass --force to overwrite it or choose another --out")
    if backend == "autoawq":
        if max_host_bytes is not None:
            raise QconvError("--max-host-memory applies to --backend native; AutoAWQ holds the whole model in "
                             "host memory")
        from ..convert.model_io import load_tokenizer, read_config
        from .awq_autoawq import run_autoawq

        folder, _, _ = read_config(model, trust_remote_code)
        ids = calib_windows(load_texts(calib.dataset), load_tokenizer(folder), calib.samples, calib.seqlen,
                            calib.seed, log=log)
        return run_autoawq(model, dst, req.bits, req.group_size, req.sym, ids, force, log=log)["checkpoint"]
    dev = resolve_device(device)
    reset_peaks(dev)
    lm = load_model(model, dtype=dtype, device=str(dev), trust_remote_code=trust_remote_code,
                    max_host_bytes=max_host_bytes)
    check_group_size(lm, req.group_size)
    state = _state_dir(work, lm, req, calib, force)
    t0 = time.perf_counter()
    run = None
    if req.method == "awq":
        ids = calib_windows(load_texts(calib.dataset), lm.tokenizer, calib.samples, calib.seqlen, calib.seed, log=log)
        # 8k-token batches: AWQ keeps whole block inputs on the device, so transients stay small
        run = Layerwise(lm, ids, dev, batch_size or default_batch_size(dev, calib.seqlen, gpu_tokens=8192),
                        spill_dir=state, max_host_bytes=max_host_bytes)
    for stale in dst.parent.glob(f".{dst.name}.*.tmp"):  # shards of a killed run; this run writes them again
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(dst, force=force) as tmp:
        shards = ShardWriter(tmp, shard_bytes)
        reports = _quantize_blocks(lm, run, state, req, dev, shards)
        if run is not None:
            run.close()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        wall = time.perf_counter() - t0
        prefix = lm.spec.layers
        for name, mod in lm.model.named_modules():  # embeddings, final norm, lm_head: fp16
            if name.startswith(prefix) or not (list(mod.parameters(recurse=False))):
                continue
            for pname, _ in mod.named_parameters(recurse=False):
                if getattr(lm.config, "tie_word_embeddings", False) and name == lm.spec.lm_head:
                    continue
                shards.add(f"{name}.{pname}", lm.tensor(f"{name}.{pname}").half())
        shards.close()
        report = {
            "qconv_version": __version__, "model": lm.source, "request": asdict(req), "calib": asdict(calib),
            "device": str(dev), "wall_s": round(wall, 3), **peaks(dev),
            "hidden_states": run.placement if run is not None else None, "max_host_bytes": max_host_bytes,
            "shard_bytes": shard_bytes, "layers": reports,
        }
        write_checkpoint_files(tmp, lm.config, quantization_config(req.bits, req.group_size, req.sym),
                               lm.tokenizer, report)
    log(f"qconv: {req.method} w{req.bits} g{req.group_size} done in {wall:.1f}s; checkpoint in {dst}. "
        f"Next: qconv eval --model {dst} --dataset FILE")
    return dst


def _quantize_blocks(lm: LoadedModel, run: Layerwise | None, state: Path, req: AwqRequest, dev: torch.device,
                     shards: ShardWriter) -> list[dict]:
    """Search (or replay the saved results of) each block, pack it and hand its tensors to ``shards``."""
    prefix = lm.spec.layers
    reports = []
    bar = tqdm(total=len(lm.layers), desc="awq", unit="block", dynamic_ncols=True)
    for i, block in iter_blocks(lm, dev):
        cached = state / f"block_{i:03d}.safetensors"
        if run is None:  # rtn: nothing to search
            report = {"layer": i}
        elif cached.is_file():  # resume: replay the fp forward for the next block, re-apply saved results
            run.run_block(block)
            found = load_tensors(cached, "AWQ block state")
            replay_block(block, found, lm.spec)
            report = load_json(state / f"block_{i:03d}.json", "AWQ block report")
        else:
            cap, remove = capture_inputs(block, lm.spec, run.tokens, req.clip_samples)
            try:
                run.run_block(block)  # [STEP 1]
            finally:
                remove()
            found, report = search_block(block, lm.spec, cap, run.position_embeddings, req)  # [STEP 2-3]
            del cap
            report = {"layer": i, **report}
            save_tensors(found, cached)
            save_json(report, state / f"block_{i:03d}.json")
        shards.add_all(pack_block(block, f"{prefix}.{i}", lm.spec, req))  # [STEP 4]
        reports.append(report)
        bar.update(1)
    bar.close()
    return reports
