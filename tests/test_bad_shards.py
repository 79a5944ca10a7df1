"""A damaged sharded checkpoint: one line naming the file and the tensor, exit code 2, and nothing written."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qconv.convert.shards import INDEX, ShardSet, ShardWriter

VICTIM = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def sharded(tiny_llama, tmp_path_factory):
    """tiny_llama re-written as several shards with an index."""
    folder = tmp_path_factory.mktemp("sharded")
    for f in tiny_llama.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, folder / f.name)
    src = ShardSet(tiny_llama)
    writer = ShardWriter(folder, max_bytes=64 << 10)
    for name in src.keys():
        writer.add(name, src.read(name))
    assert len(writer.close()) > 2
    return folder


def damage(sharded, tmp_path, case) -> tuple:
    model = tmp_path / "model"
    shutil.copytree(sharded, model)
    shard = model / json.loads((model / INDEX).read_text())["weight_map"][VICTIM]
    if case == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 100])
        return model, shard, "truncated"
    tensors = load_file(shard)
    if case == "missing":
        del tensors[VICTIM]
        needle = "does not hold it"
    else:
        tensors[VICTIM] = tensors[VICTIM][:, :-8].contiguous()
        needle = "config.json implies"
    save_file(tensors, shard, metadata={"format": "pt"})
    return model, shard, needle


@pytest.mark.parametrize("case", ["truncated", "missing", "shape"])
@pytest.mark.parametrize("stage", ["calibrate", "awq", "convert"])
def test_damaged_shard(case, stage, sharded, tmp_path, run_cli):
    model, shard, needle = damage(sharded, tmp_path, case)
    out = tmp_path / "out"
    if stage == "convert":
        args = ["convert", "--model", model, "--dst-path", out]
    else:
        args = [stage, "--model", model, "--work-dir", out, "--calib-samples", 1, "--calib-seqlen", 16]
    code, _, err = run_cli(*args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0] and str(shard) in lines[0], lines[0]
    named = re.search(r"tensor '([^']+)'", lines[0])
    assert named, lines[0]
    if case == "truncated":  # the tensor whose bytes are cut off: one the index places in that shard
        assert json.loads((model / INDEX).read_text())["weight_map"][named.group(1)] == shard.name
    else:
        assert named.group(1) == VICTIM, lines[0]
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


def test_sharded_checkpoint_reads_like_the_single_file(sharded, tiny_llama):
    a, b = ShardSet(sharded), load_file(tiny_llama / "model.safetensors")
    assert set(a.keys()) == set(b) and all(torch.equal(a.read(k), b[k]) for k in b)


def test_no_room_for_two_blocks(tiny_llama, tiny_block_bytes, tmp_path, run_cli, monkeypatch):
    from qconv.convert import memory

    block = tiny_block_bytes
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 2 * block - 1)
    code, _, err = run_cli("calibrate", "--model", tiny_llama, "--work-dir", tmp_path / "w", "--calib-samples", 1,
                           "--calib-seqlen", 16, "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "two must fit in host memory" in err, err
    assert not (tmp_path / "w").exists()
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 2 * block)
    code, _, err = run_cli("calibrate", "--model", tiny_llama, "--work-dir", tmp_path / "w", "--calib-samples", 1,
                           "--calib-seqlen", 16, "--device", "cpu")
    assert code == 0, err
