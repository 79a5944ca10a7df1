"""`qconv calibrate` and `qconv kv-params` on tiny random models and on the real SmolLM2-135M."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from qconv.pipelines.data import calib_windows, load_texts


def rope_by_hand(x, positions, theta):
    """Rotary embedding written out: x [S, H, D], rotate_half pairing of (i, i + D/2)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions[:, None].double() * inv[None]  # [S, D/2]
    cos, sin = ang.cos()[:, None, :].float(), ang.sin()[:, None, :].float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def test_key_stats_are_post_rotary(tiny_model, tmp_path, run_cli):
    code, out, err = run_cli("calibrate", "--model", tiny_model, "--work-dir", tmp_path, "--calib-samples", 3,
                             "--calib-seqlen", 32, "--device", "cpu")
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = calib_windows(load_texts("c4"), tok, 3, 32, seed=0)
    cfg = model.config
    layer = model.model.layers[0]
    with torch.no_grad():
        h = layer.input_layernorm(model.model.embed_tokens(ids))  # [N, S, hidden]
        k = layer.self_attn.k_proj(h).view(3, 32, cfg.num_key_value_heads, -1)  # [N, S, Hkv, D]
        v = layer.self_attn.v_proj(h).view(3, 32, cfg.num_key_value_heads, -1)
        theta = cfg.rope_parameters["rope_theta"]
        k_rot = torch.stack([rope_by_hand(k[n], torch.arange(32), theta) for n in range(3)])
    key = load_file(tmp_path / "key_stats.safetensors")
    value = load_file(tmp_path / "value_stats.safetensors")
    assert torch.allclose(key["layers.0.min"], k_rot.amin(dim=(0, 1)), atol=1e-5)
    assert torch.allclose(key["layers.0.max"], k_rot.amax(dim=(0, 1)), atol=1e-5)
    assert torch.allclose(key["layers.0.absmax"], k_rot.abs().amax(dim=(0, 1)), atol=1e-5)
    # int4's K center: the mean over the positions after the first (position 0 is the sink, kept unquantized)
    assert torch.allclose(key["layers.0.mean"], k_rot[:, 1:].mean(dim=(0, 1)), atol=1e-5)
    assert not torch.allclose(key["layers.0.mean"], k_rot.mean(dim=(0, 1)), atol=1e-4)
    # Pre-rotary K has other extremes: the stats really are taken after rotary.
    assert not torch.allclose(key["layers.0.max"], k.amax(dim=(0, 1)), atol=1e-3)
    assert torch.allclose(value["layers.0.max"], v.amax(dim=(0, 1)), atol=1e-5)
    inputs = load_file(tmp_path / "inputs_stats.safetensors")
    flat = h.reshape(-1, h.shape[-1])
    for name in ("q_proj", "k_proj", "v_proj"):
        pre = f"model.layers.0.self_attn.{name}"
        assert torch.allclose(inputs[f"{pre}.max"], flat.amax(0), atol=1e-5)
        assert torch.allclose(inputs[f"{pre}.mean"], flat.mean(0), atol=1e-5)
        assert torch.allclose(inputs[f"{pre}.absmean"], flat.abs().mean(0), atol=1e-5)
    assert inputs["model.layers.1.mlp.down_proj.absmax"].shape == (cfg.intermediate_size,)
    meta = json.loads((tmp_path / "calibrate.json").read_text())
    assert meta["tokens"] == 96 and meta["shape"]["num_kv_heads"] == 2


def test_rerun_skips_and_other_model_refused(tiny_llama, tmp_path, run_cli, make_tiny):
    args = ["calibrate", "--model", tiny_llama, "--work-dir", tmp_path, "--calib-samples", 2, "--calib-seqlen", 16]
    assert run_cli(*args)[0] == 0
    before = (tmp_path / "key_stats.safetensors").stat().st_mtime_ns
    code, out, _ = run_cli(*args)
    assert code == 0 and "skipping" in out
    assert (tmp_path / "key_stats.safetensors").stat().st_mtime_ns == before
    other = make_tiny("llama", seed=1)
    code, _, err = run_cli("calibrate", "--model", other, "--work-dir", tmp_path, "--calib-samples", 2,
                           "--calib-seqlen", 16)
    assert code == 2 and "different model" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "key_stats.safetensors").stat().st_mtime_ns == before
    assert run_cli(*args, "--force")[0] == 0
    assert (tmp_path / "key_stats.safetensors").stat().st_mtime_ns != before


def test_kv_params_cli(tiny_llama, tmp_path, run_cli):
    assert run_cli("calibrate", "--model", tiny_llama, "--work-dir", tmp_path, "--calib-samples", 2,
                   "--calib-seqlen", 16)[0] == 0
    key = load_file(tmp_path / "key_stats.safetensors")
    code, out, err = run_cli("kv-params", "--work-dir", tmp_path)
    assert code == 0, err
    p = load_file(tmp_path / "kv_qparams.safetensors")
    lo, hi = key["layers.1.min"].amin(-1), key["layers.1.max"].amax(-1)
    assert torch.allclose(p["layers.1.k_scale"], (hi - lo) / 255)
    assert torch.allclose(p["layers.1.k_zp"], (hi + lo) / 2)
    assert run_cli("kv-params", "--work-dir", tmp_path, "--kv-sym", "--granularity", "layer")[0] == 0
    p = load_file(tmp_path / "kv_qparams.safetensors")
    amax = key["layers.1.absmax"].max()
    assert torch.allclose(p["layers.1.k_scale"], torch.full((2,), float(amax) / 127))
    assert torch.all(p["layers.1.k_zp"] == 0)
    summary = json.loads((tmp_path / "kv_qparams.json").read_text())
    assert summary["sym"] is True and summary["granularity"] == "layer" and len(summary["layers"]) == 2


@pytest.mark.parametrize("case", ["no_stats", "bad_tp", "foreign_stats"])
def test_kv_params_bad_input(case, tiny_llama, tmp_path, run_cli, make_tiny, tmp_path_factory):
    if case != "no_stats":
        assert run_cli("calibrate", "--model", tiny_llama, "--work-dir", tmp_path, "--calib-samples", 1,
                       "--calib-seqlen", 16)[0] == 0
    args = ["kv-params", "--work-dir", tmp_path]
    if case == "bad_tp":
        args += ["--num-tp", 3]
    if case == "foreign_stats":  # a key_stats file from a model with another shape
        other = make_tiny("llama", num_key_value_heads=4)
        w2 = tmp_path_factory.mktemp("w2")
        assert run_cli("calibrate", "--model", other, "--work-dir", w2, "--calib-samples", 1,
                       "--calib-seqlen", 16)[0] == 0
        (tmp_path / "key_stats.safetensors").write_bytes((w2 / "key_stats.safetensors").read_bytes())
    code, out, err = run_cli(*args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert {"no_stats": "qconv calibrate", "bad_tp": "does not divide", "foreign_stats": "different model"}[case] in err
    assert not (tmp_path / "kv_qparams.safetensors").exists()


def test_smollm2_calibrate_and_kv_params(smollm2_gguf, tmp_path, run_cli):
    code, out, err = run_cli("calibrate", "--model", smollm2_gguf, "--work-dir", tmp_path, "--calib-samples", 16,
                             "--calib-seqlen", 512, "--device", "cpu")
    assert code == 0, err
    key = load_file(tmp_path / "key_stats.safetensors")
    assert len({k.split(".")[1] for k in key}) == 30
    assert all(key[f"layers.{i}.max"].shape == (3, 64) for i in range(30))
    assert all(torch.all(key[f"layers.{i}.max"] >= key[f"layers.{i}.min"]) for i in range(30))
    meta = json.loads((tmp_path / "calibrate.json").read_text())
    assert meta["tokens"] == 16 * 512 and meta["request"]["dataset"] == "c4"
    code, out, err = run_cli("kv-params", "--work-dir", tmp_path)
    assert code == 0, err
    p = load_file(tmp_path / "kv_qparams.safetensors")
    assert len(p) == 30 * 4 and p["layers.29.v_scale"].shape == (3,)
    assert torch.all(p["layers.0.k_scale"] > 0)


# 4 windows of 192 tokens at hidden size 64 in float32: 196,608 bytes of hidden states, more than half of a
# --max-host-memory that holds just two of tiny_llama's blocks (2 x 147,968 bytes).
SPILL_WINDOWS = ["--calib-samples", 4, "--calib-seqlen", 192]


def test_hidden_states_spill_to_disk_when_host_memory_is_short(tiny_llama, tiny_block_bytes, tmp_path, run_cli):
    """With --max-host-memory too low for them, calibrate and awq keep the windows' hidden states in a file beside
    their output, one batch at a time: the same statistics and checkpoint as in memory, the record says where they
    were and what the cap was, and the file is gone afterwards."""
    cap = 2 * tiny_block_bytes  # the least that streaming accepts
    common = ["--model", tiny_llama, *SPILL_WINDOWS, "--device", "cpu", "--batch-size", 2]
    for name, limit in (("mem", []), ("disk", ["--max-host-memory", cap])):
        assert run_cli("calibrate", *common, *limit, "--work-dir", tmp_path / name)[0] == 0
        code, _, err = run_cli("awq", *common, *limit, "--w-bits", 4, "--w-group-size", 32,
                               "--work-dir", tmp_path / name, "--out", tmp_path / name / "awq")
        assert code == 0, err
    for f in ("inputs_stats", "key_stats", "value_stats"):
        a, b = (load_file(tmp_path / n / f"{f}.safetensors") for n in ("mem", "disk"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    ckpt = {n: load_file(next((tmp_path / n / "awq").glob("*.safetensors"))) for n in ("mem", "disk")}
    assert all(torch.equal(ckpt["mem"][k], ckpt["disk"][k]) for k in ckpt["mem"])
    for n, where, limit in (("mem", "host", None), ("disk", "disk", cap)):
        for record in (tmp_path / n / "calibrate.json", tmp_path / n / "awq" / "awq.json"):
            meta = json.loads(record.read_text())
            assert (meta["hidden_states"], meta["max_host_bytes"]) == (where, limit), record
    assert not list(tmp_path.rglob(".qconv-hidden-*"))


def test_hidden_states_spill_on_a_full_disk_is_one_line(tiny_llama, tiny_block_bytes, tmp_path, run_cli,
                                                        monkeypatch):
    """No room left where the hidden states spill: one line naming the file, exit 2, no statistics written."""
    import errno
    import os

    from qconv.pipelines import layerwise

    def full(*a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(layerwise.os, "pwrite", full)
    code, _, err = run_cli("calibrate", "--model", tiny_llama, *SPILL_WINDOWS, "--max-host-memory",
                           2 * tiny_block_bytes, "--device", "cpu", "--work-dir", tmp_path / "w")
    assert code == 2 and "cannot write hidden states" in err and len(err.strip().splitlines()) == 1
    assert not list((tmp_path / "w").glob("*.safetensors"))
