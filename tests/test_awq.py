"""`qconv awq`: the AutoAWQ GEMM format, the search, resume, and bad input."""
import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from qconv.convert import quant as Q
from qconv.convert.awq_export import dequantized_state_dict, quantize_linear
from qconv.pipelines.awq_search import QuantCfg, scale_candidates, search_clip

SMALL = ["--calib-samples", 4, "--calib-seqlen", 128]


def test_pack_matches_autoawq_dequantize_gemm():
    awq_utils = pytest.importorskip("awq.utils.packing_utils")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)  # [out, in]
    packed = quantize_linear(w, bits=4, group_size=64, sym=False)
    ours = Q.dequantize(*Q.awq_unpack(packed["qweight"], packed["qzeros"], packed["scales"]))  # [out, in]
    theirs = awq_utils.dequantize_gemm(packed["qweight"], packed["qzeros"], packed["scales"], 4, 64)  # [in, out]
    assert torch.equal(theirs.float().t(), ours.half().float())
    codes = torch.randint(0, 16, (32, 64), generator=g, dtype=torch.int32)
    assert torch.equal(Q.unpack_int4_awq(Q.pack_int4_awq(codes)), codes)
    assert packed["qweight"].shape == (256, 8) and packed["qzeros"].shape == (4, 8)
    assert packed["scales"].shape == (4, 64) and packed["scales"].dtype == torch.float16


def test_scale_candidates_normalised_with_identity_last():
    x_mean, w_mean = torch.tensor([4.0, 1.0, 0.25]), torch.tensor([0.5, 0.5, 1.0])
    cands, alphas = scale_candidates(x_mean, w_mean, n_grid=4)
    assert cands.shape == (5, 3) and alphas == [0, 0.25, 0.5, 0.75, None]
    assert torch.allclose(cands[:4].amax(1) * cands[:4].amin(1), torch.ones(4))
    assert torch.equal(cands[-1], torch.ones(3))
    # a = 0.5: s ~ sqrt(x_mean) / sqrt(w_mean), normalised
    raw = x_mean.sqrt() / (w_mean.sqrt() + 1e-4)
    assert torch.allclose(cands[2], raw / (raw.max() * raw.min()).sqrt())


def test_clip_search_clips_an_outlier_group_only_when_it_helps():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 64, generator=g) * 0.02
    w[0, 3] = 1.0  # one outlier dominates row 0's group, and its input channel is always 0
    x = torch.randn(256, 64, generator=g)
    x[:, 3] = 0.0
    clip_max, ratio = search_clip(w, x, QuantCfg(4, 64, False))
    assert ratio[0, 0] < 0.6  # clipping the useless outlier lowers the output error
    assert clip_max.shape == (4, 1) and torch.all(ratio[1:] > 0.5)


def test_clip_search_by_covariance_equals_the_per_token_error():
    """The search scores candidates by d^T C d (C = X^T X / n) once tokens outnumber the group size, and by
    per-token products otherwise. Tokens repeated 4x keep C, so both paths must choose the same clips."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 128, generator=g) * 0.02
    w[::5, ::11] *= 6  # outliers, so that some groups clip
    x = torch.randn(48, 128, generator=g) * torch.rand(128, generator=g) * 3  # 48 tokens < g=64: direct
    direct = search_clip(w, x, QuantCfg(4, 64, False))
    by_cov = search_clip(w, x.repeat(4, 1), QuantCfg(4, 64, False))  # 192 > 64: covariance
    assert (direct[1] < 1).any() and (direct[1] == 1).any()
    assert torch.equal(direct[1], by_cov[1])
    assert torch.allclose(direct[0], by_cov[0])


def test_awq_checkpoint_format_and_eval(make_tiny, tmp_path, run_cli, wiki_path):
    model = make_tiny("qwen2", hidden_size=128, intermediate_size=256)
    code, out, err = run_cli("awq", "--model", model, "--work-dir", tmp_path, "--w-group-size", 64, *SMALL)
    assert code == 0, err
    ckpt = tmp_path / "awq_checkpoint"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                                          "version": "gemm", "modules_to_not_convert": None}
    t = load_file(ckpt / "model.safetensors")
    q = "model.layers.1.mlp.down_proj"
    assert t[f"{q}.qweight"].dtype == torch.int32 and t[f"{q}.qweight"].shape == (256, 128 // 8)
    assert t[f"{q}.qzeros"].shape == (256 // 64, 128 // 8) and t[f"{q}.scales"].dtype == torch.float16
    assert t["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16  # qwen2 qkv bias kept
    assert "model.layers.0.input_layernorm.weight" in t and "lm_head.weight" in t
    report = json.loads((ckpt / "awq.json").read_text())
    assert len(report["layers"]) == 2 and report["layers"][0]["groups"][0]["prev_op"] == "input_layernorm"
    assert {"alpha", "mse", "mse_no_scale"} <= set(report["layers"][0]["groups"][0])
    assert report["layers"][0]["groups"][0]["mse"] <= report["layers"][0]["groups"][0]["mse_no_scale"]
    assert (ckpt / "tokenizer.json").exists() or (ckpt / "tokenizer_config.json").exists()
    code, out, err = run_cli("eval", "--model", ckpt, "--dataset", wiki_path, "--windows", 1, "--seqlen", 64)
    assert code == 0, err
    assert math.isfinite(float(out.strip().splitlines()[-1].split()[1]))


def test_awq_beats_rtn_on_smollm2(smollm2_gguf, tmp_path, run_cli, wiki_path):
    """Real model, real data: AWQ w4 g64 lowers perplexity against plain RTN on the same grid."""
    common = ["--model", smollm2_gguf, "--w-group-size", 64, "--calib-samples", 4, "--calib-seqlen", 256]
    assert run_cli("awq", *common, "--work-dir", tmp_path / "rtn", "--method", "rtn")[0] == 0
    assert run_cli("awq", *common, "--work-dir", tmp_path / "awq")[0] == 0
    ppl = {}
    for name in ("rtn", "awq"):
        code, out, err = run_cli("eval", "--model", tmp_path / name / "awq_checkpoint", "--dataset", wiki_path,
                                 "--windows", 2, "--seqlen", 512)
        assert code == 0, err
        ppl[name] = float(out.strip().splitlines()[-1].split()[1])
    assert ppl["awq"] < ppl["rtn"], ppl
    state = dequantized_state_dict(tmp_path / "awq" / "awq_checkpoint",
                                   {"quant_method": "awq", "bits": 4, "version": "gemm"}, torch.float32)
    assert state["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)


def test_killed_run_resumes_to_identical_files(make_tiny, tmp_path):
    model = make_tiny("llama", num_hidden_layers=6, hidden_size=128, intermediate_size=256)
    args = [sys.executable, "-m", "qconv.cli", "awq", "--model", str(model), "--w-group-size", 64,
            "--calib-samples", 16, "--calib-seqlen", 256, "--device", "cpu"]
    args = [str(a) for a in args]
    assert subprocess.run([*args, "--work-dir", str(tmp_path / "full")], capture_output=True).returncode == 0
    proc = subprocess.Popen([*args, "--work-dir", str(tmp_path / "cut")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = tmp_path / "cut" / "awq_state"
    deadline = time.time() + 120
    while not (state / "block_001.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(state.glob("block_*.json"))
    assert 2 <= len(done) < 6, "the run was not cut mid-way"
    assert not (tmp_path / "cut" / "awq_checkpoint").exists()
    assert list((tmp_path / "cut").glob(".awq_checkpoint.*.tmp")), "the killed run was writing its shards"
    r = subprocess.run([*args, "--work-dir", str(tmp_path / "cut")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not list((tmp_path / "cut").glob(".awq_checkpoint.*.tmp")), "the killed run's shards are cleared"
    a = (tmp_path / "full" / "awq_checkpoint" / "model.safetensors").read_bytes()
    b = (tmp_path / "cut" / "awq_checkpoint" / "model.safetensors").read_bytes()
    assert a == b


@pytest.mark.parametrize("case", ["group", "bits", "exists"])
def test_awq_bad_input(case, smollm2_gguf, tiny_llama, tmp_path, run_cli):
    if case == "group":
        code, _, err = run_cli("awq", "--model", smollm2_gguf, "--work-dir", tmp_path, *SMALL)
        needle = "valid group sizes for this model: 32, 64"
    elif case == "bits":
        code, _, err = run_cli("awq", "--model", tiny_llama, "--work-dir", tmp_path, "--w-bits", 5)
        needle = "--w-bits must be 4 or 8"
    else:
        (tmp_path / "awq_checkpoint").mkdir()
        (tmp_path / "awq_checkpoint" / "mine.txt").write_text("keep")
        code, _, err = run_cli("awq", "--model", tiny_llama, "--work-dir", tmp_path, "--w-group-size", 32, *SMALL)
        needle = "already exists"
        assert (tmp_path / "awq_checkpoint" / "mine.txt").read_text() == "keep"
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_int8_weight_only(make_tiny, tmp_path, run_cli, wiki_path):
    model = make_tiny("llama", hidden_size=128, intermediate_size=256)
    code, _, err = run_cli("awq", "--model", model, "--work-dir", tmp_path, "--w-bits", 8, "--w-group-size", -1,
                           *SMALL)
    assert code == 0, err
    ckpt = tmp_path / "awq_checkpoint"
    cfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "qconv_w8" and cfg["bits"] == 8 and cfg["sym"] is True
    t = load_file(ckpt / "model.safetensors")
    assert t["model.layers.0.mlp.up_proj.qweight"].dtype == torch.int8
    assert t["model.layers.0.mlp.up_proj.scales"].shape == (256, 1)  # per output channel
    ppl = {}
    for name, path in (("fp", model), ("w8", ckpt)):
        code, out, err = run_cli("eval", "--model", path, "--dataset", wiki_path, "--windows", 2, "--seqlen", 64)
        assert code == 0, err
        ppl[name] = float(out.strip().splitlines()[-1].split()[1])
    assert ppl["w8"] != ppl["fp"] and abs(ppl["w8"] / ppl["fp"] - 1) < 0.01, ppl  # int8 costs almost nothing
