"""Weights stream from disk: peak host memory does not grow with the number of layers, and the outputs equal
those of the resident (from_pretrained) path."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from qconv.convert.shards import INDEX, ShardSet

# Wide enough that a layer's weights (4·H² + 3·H·I floats, 16.8 MB in fp32) dwarf the per-run noise.
WIDE = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8)
LAYER_BYTES = (4 * 512 * 512 + 3 * 512 * 2048) * 4

# The whole pipeline (calibrate, kv-params, awq, convert) in a fresh interpreter. Each stage's record holds the
# peak RSS since that stage began (each resets it); the final VmHWM covers convert and what follows its record.
PIPELINE = """
import functools, json, sys
from pathlib import Path
from qconv.convert import model_io
from qconv.convert.memory import peak_host_rss
from qconv.pipelines import awq, calibrate
from qconv.pipelines.awq_request import AwqRequest
from qconv.pipelines.calibrate import CalibRequest
from qconv.pipelines.quantize import quantize
model, dst, mode, shard = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if mode == "resident":
    calibrate.load_model = awq.load_model = functools.partial(model_io.load_model, stream=False)
quantize(model, str(dst), None, AwqRequest(group_size=128, n_grid=4, clip_samples=256),
         CalibRequest(samples=2, seqlen=64), device="cpu", shard_bytes=shard, log=lambda *a: None)
work = dst.with_name(dst.name + ".work")
records = [work / "calibrate.json", work / "kv_qparams.json", work / "awq_checkpoint/awq.json", dst / "convert.json"]
peaks = [json.loads(f.read_text())["peak_host_rss_bytes"] for f in records]
print(json.dumps({"peak": max(peaks + [peak_host_rss()])}))
"""


def run_pipeline(model, dst, mode="stream", shard_bytes=16 << 20) -> int:
    # glibc serves allocations below its dynamic mmap threshold (which grows to 32 MB as big blocks are freed)
    # from heaps it seldom returns, so a tiny model's few-MB tensors pile up; a real layer's tensors are above
    # it. A fixed 1 MB threshold makes these tensors behave like real ones.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    r = subprocess.run([sys.executable, "-c", PIPELINE, str(model), str(dst), mode, str(shard_bytes)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["peak"]


def tensors_of(folder) -> dict[str, torch.Tensor]:
    shards = ShardSet(folder)
    return {name: shards.read(name) for name in shards.keys()}


@pytest.fixture(scope="module")
def wide_models(make_tiny):
    return {n: make_tiny("llama", num_hidden_layers=n, **WIDE) for n in (4, 16)}


def test_peak_rss_does_not_grow_with_layers(wide_models, tmp_path):
    small = run_pipeline(wide_models[4], tmp_path / "ws4")
    big = run_pipeline(wide_models[16], tmp_path / "ws16")
    # The resident path would hold 12 more layers (about 200 MB) for the bigger model.
    assert big - small < 4 * LAYER_BYTES, (small, big)
    ckpt = tmp_path / "ws16.work" / "awq_checkpoint"
    assert (ckpt / INDEX).is_file(), "16 MB shards: the 16-layer checkpoint must span several files"
    weight_map = json.loads((ckpt / INDEX).read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1 and set(weight_map) == set(tensors_of(ckpt))


def test_streamed_outputs_equal_the_resident_path(wide_models, tmp_path):
    streamed = run_pipeline(wide_models[4], tmp_path / "s", shard_bytes=1 << 40)
    resident = run_pipeline(wide_models[4], tmp_path / "r", mode="resident", shard_bytes=1 << 40)
    assert resident - streamed > 2 * LAYER_BYTES, (streamed, resident)  # the measurement can see the difference
    for f in ("inputs_stats.safetensors", "key_stats.safetensors", "value_stats.safetensors"):
        a, b = load_file(tmp_path / "s.work" / f), load_file(tmp_path / "r.work" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    a, b = tensors_of(tmp_path / "s.work" / "awq_checkpoint"), tensors_of(tmp_path / "r.work" / "awq_checkpoint")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    for f in sorted((tmp_path / "s" / "weights").iterdir()):
        assert f.read_bytes() == (tmp_path / "r" / "weights" / f.name).read_bytes(), f.name
