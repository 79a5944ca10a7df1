"""--max-host-memory and --shard-size on the stage commands, and every stage's record of its peak memory.

The spill that a low --max-host-memory forces is tested with calibrate's other spill tests (test_calibrate.py).
"""
from __future__ import annotations

import json

import pytest
import torch

from qconv.convert.shards import INDEX, SINGLE, ShardSet
from qconv.convert.sizes import format_size, parse_size

TINY_RUN = ["--calib-samples", 2, "--calib-seqlen", 32, "--device", "cpu"]


def out_args(stage, tmp_path):
    return ["--dst-path", tmp_path / "ws"] if stage == "quantize" else ["--work-dir", tmp_path / "w"]


def test_sizes_read_as_people_write_them():
    assert parse_size("8GiB") == 8 << 30 and parse_size("8G") == 8 << 30 and parse_size("8gb") == 8 * 10**9
    assert parse_size("500MB") == 500 * 10**6 and parse_size("1.5KiB") == 1536 and parse_size(" 123 ") == 123
    assert (format_size(4 << 30), format_size(1536), format_size(300)) == ("4GiB", "1.5KiB", "300B")
    for bad in ("", "GiB", "8 XB", "-1GiB", "1.5.2GB", "0", "0.1B"):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.mark.parametrize("stage,option,value", [
    ("calibrate", "--max-host-memory", "8XB"), ("awq", "--max-host-memory", "lots"),
    ("quantize", "--max-host-memory", "0"), ("awq", "--shard-size", "-2GB"), ("quantize", "--shard-size", "4 GiBs"),
])
def test_bad_size_is_one_line(stage, option, value, tiny_llama, tmp_path, run_cli):
    code, _, err = run_cli(stage, "--model", tiny_llama, *out_args(stage, tmp_path), option, value, *TINY_RUN)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and option in lines[0] and repr(value) in lines[0], err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("stage", ["calibrate", "awq", "quantize"])
def test_cap_below_two_blocks_is_one_line(stage, tiny_llama, tiny_block_bytes, tmp_path, run_cli):
    code, _, err = run_cli(stage, "--model", tiny_llama, *out_args(stage, tmp_path),
                           "--max-host-memory", 2 * tiny_block_bytes - 1, *TINY_RUN)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "two must fit in host memory" in lines[0], err
    assert "raise --max-host-memory" in lines[0], lines[0]
    assert not any(tmp_path.iterdir()), sorted(tmp_path.rglob("*"))


def test_shard_size_and_stage_records(tiny_llama, tmp_path, run_cli):
    """quantize with small shards writes several files and an index holding the same tensors as awq's default
    single file; each of its stages (calibrate, kv-params, awq, convert) records its peak memory and caps."""
    common = ["--model", tiny_llama, "--w-group-size", 32, *TINY_RUN]
    code, _, err = run_cli("quantize", *common, "--dst-path", tmp_path / "ws", "--shard-size", "1MiB",
                           "--max-host-memory", "1GiB")
    assert code == 0, err
    code, _, err = run_cli("awq", *common, "--work-dir", tmp_path / "one")
    assert code == 0, err
    small, single = tmp_path / "ws.work" / "awq_checkpoint", tmp_path / "one" / "awq_checkpoint"

    assert (single / SINGLE).is_file() and not (single / INDEX).exists()
    weight_map = json.loads((small / INDEX).read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    assert len(files) > 2 and not (small / SINGLE).exists(), files
    shards = ShardSet(small)
    for f in files:  # a shard over 1 MiB holds one tensor that alone is bigger (the embedding, the head)
        names = [n for n, g in weight_map.items() if g == f]
        nbytes = sum(shards.read(n).nbytes for n in names)
        assert nbytes <= 1 << 20 or len(names) == 1, (f, names)
    a, b = ShardSet(single), shards
    assert set(a.keys()) == set(b.keys()) == set(weight_map)
    assert all(torch.equal(a.read(k), b.read(k)) for k in a.keys())

    records = {"calibrate": tmp_path / "ws.work" / "calibrate.json", "kv-params": tmp_path / "ws.work" /
               "kv_qparams.json", "awq": small / "awq.json", "convert": tmp_path / "ws" / "convert.json"}
    for stage, path in records.items():
        meta = json.loads(path.read_text())
        assert meta["peak_host_rss_bytes"] > 0 and meta["peak_gpu_bytes"] is None, (stage, meta)
    awq_meta = json.loads(records["awq"].read_text())
    assert (awq_meta["shard_bytes"], awq_meta["max_host_bytes"]) == (1 << 20, 1 << 30)
    assert json.loads(records["calibrate"].read_text())["max_host_bytes"] == 1 << 30
    assert "convert.json" in json.loads((tmp_path / "ws" / "manifest.json").read_text())["files"]
