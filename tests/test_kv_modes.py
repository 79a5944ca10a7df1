"""KV cache modes (convert/kv_mode.py): online per-token int8 / int4 beside calibrated static int8 and fp16.

Per-token quantization maths, the cache's bytes per token, attention over the codes, runtime == eval for every mode,
old workspaces, and bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qconv import QconvError
from qconv.cli import main
from qconv.convert.kv_file import load_k_centers
from qconv.convert.kv_mode import KVTransform, bytes_per_token
from qconv.convert.quant import (hadamard, kv_rotate, kv_rotation, kv_token_dequantize, kv_token_fake_quantize,
                                 kv_token_quantize, kv_unrotate, pack_int4_pairs, unpack_int4_pairs)
from qconv.convert.workspace_config import WorkspaceConfig
from qconv.runtime.kv_cache import KVCache, cache_attention
MODES = ("fp16", "int8-static", "int8", "int4")


def assert_one_line_error(code, err, needle):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("qconv: error:"), err
    assert needle in lines[0], lines[0]


def test_per_token_round_trip_is_exact_on_the_grid_and_within_half_a_step_off_it():
    grid = torch.arange(16.0).reshape(1, 16) * 0.5 - 2  # min -2, step 0.5: int4's grid exactly
    codes, scale, zp = kv_token_quantize(grid, 4)
    assert codes.tolist() == [list(range(16))] and scale.tolist() == [0.5] and zp.tolist() == [-2.0]
    assert torch.equal(kv_token_dequantize(codes, scale, zp, torch.float32), grid)
    x = torch.randn(2, 3, 7, 64, generator=torch.Generator().manual_seed(0))  # [B, H, S, D]: params per (b, h, s)
    for bits in (8, 4):
        codes, scale, zp = kv_token_quantize(x, bits)
        assert codes.shape == x.shape and scale.shape == zp.shape == x.shape[:-1]
        assert int(codes.max()) <= 2 ** bits - 1
        assert torch.equal(scale, scale.half().float()) and torch.equal(zp, zp.half().float())  # stored as fp16
        err = (kv_token_dequantize(codes, scale, zp, torch.float32) - x).abs()
        assert bool((err <= scale[..., None] * 0.5 + 1e-3 * x.abs().amax(-1, keepdim=True)).all())


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 15, 0]], dtype=torch.uint8)
    packed = pack_int4_pairs(codes)
    assert packed.tolist() == [[0x21, 0x43, 0x0F]]
    assert torch.equal(unpack_int4_pairs(packed), codes)


def test_bytes_per_token_ratios_params_included():
    llama3_8b = dict(num_layers=32, kv_heads=8, head_dim=128)  # head_dim 128
    fp16 = bytes_per_token("fp16", **llama3_8b)
    assert fp16 == 2 * 32 * 8 * 128 * 2
    assert bytes_per_token("int4", **llama3_8b) / fp16 == (64 + 4) / 256 <= 0.27
    assert bytes_per_token("int8", **llama3_8b) / fp16 == (128 + 4) / 256 <= 0.52
    smol = dict(num_layers=30, kv_heads=3, head_dim=64)  # SmolLM2, head_dim 64
    fp16 = bytes_per_token("fp16", **smol)
    assert bytes_per_token("int4", **smol) / fp16 == (32 + 4) / 128  # 0.281
    assert bytes_per_token("int8", **smol) / fp16 == (64 + 4) / 128  # 0.531
    for bits, mode in ((8, "int8"), (4, "int4")):  # the cache holds exactly what the function counts
        cache = KVCache(3, 2, 2, 10, 16, torch.float16, torch.device("cpu"), online_bits=bits)
        assert cache.nbytes() == 2 * 10 * bytes_per_token(mode, 3, 2, 16)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("S", [1, 3, 40])  # 1, 3: attention over the codes; 40: dequantized for SDPA
def test_online_cache_attention_equals_float64_attention_over_the_dequantized_cache(bits, S):
    g = torch.Generator().manual_seed(bits + S)
    B, Hq, Hkv, L, D = 2, 6, 3, 45, 16
    cache = KVCache(1, B, Hkv, 64, D, torch.float32, torch.device("cpu"), online_bits=bits)
    k, v = torch.randn(B, Hkv, L, D, generator=g) * 3 + 1, torch.randn(B, Hkv, L, D, generator=g)
    cache.write(0, torch.arange(L).expand(B, L), k, v, 0)
    kc, kp, vc, vp = cache.codes(0, B, L)
    kd = kc.double() * kp[..., :1].double() + kp[..., 1:].double()  # x = c * scale + zp, per (token, head)
    vd = vc.double() * vp[..., :1].double() + vp[..., 1:].double()
    q = torch.randn(B, Hq, S, D, generator=g)
    pos = torch.stack([torch.arange(L - S - 5, L - 5), torch.arange(L - S, L)])  # row 0 sees fewer keys
    mask = torch.arange(L)[None, None, None, :] <= pos[:, None, :, None]  # [B, 1, S, L]
    ref = cache_attention(q.double(), kd, vd, mask)
    out = cache.attention(0, q, L, mask, False)
    assert (out.double() - ref).abs().max() < 1e-5
    assert (kd - k.double()).abs().max() > 0  # the cache really holds codes


def test_hadamard_rotation_is_orthonormal_and_symmetric():
    assert torch.allclose(hadamard(2), torch.tensor([[1.0, 1.0], [1.0, -1.0]]) / 2 ** 0.5)
    assert torch.allclose(hadamard(4)[1], torch.tensor([1.0, -1.0, 1.0, -1.0]) / 2)
    for D in (64, 128, 96):  # 96: three Hadamard blocks of 32
        R = kv_rotation(D)
        assert torch.equal(R, R.T) and torch.allclose(R @ R, torch.eye(D), atol=1e-6)
    R = kv_rotation(96)
    assert torch.equal(R[:32, :32], hadamard(32)) and not R[:32, 32:].any()
    x, c = torch.randn(5, 64), torch.randn(64)
    assert torch.allclose(kv_unrotate(kv_rotate(x, kv_rotation(64), c), kv_rotation(64), c), x, atol=1e-5)


def test_rotation_spreads_an_outlier_channel_and_the_sink_stays_exact():
    """One channel 20x the others: per token, int4's step follows that channel; after R it is spread over D."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 64, generator=g)  # [B, H, S, D]
    x[..., 5] *= 20
    R = kv_rotation(64)
    plain = (kv_token_fake_quantize(x, 4) - x).pow(2).mean()
    rotated = (kv_token_fake_quantize(x, 4, R) - x).pow(2).mean()
    assert rotated < plain / 4
    y = kv_token_fake_quantize(x, 4, R, x.mean(dim=(0, 2))[:, None], sink=2)
    assert torch.equal(y[:, :, :2], x[:, :, :2]) and not torch.equal(y[:, :, 2:], x[:, :, 2:])


def test_on_smollm2_the_transform_cuts_the_int4_attention_error(smollm2_hf, wiki_path):
    """Real K, V and q (SmolLM2, one 512-token wiki window, every layer): the attention output's error under plain
    per-token int4 > with Hadamard > with Hadamard, K centers ((min + max) / 2 of this window's K) and a sink."""
    import torch.nn.functional as F

    from qconv.convert.model_io import load_model
    from qconv.convert.perplexity import eval_windows
    from qconv.pipelines.data import eval_text
    from qconv.pipelines.eval import block_by_block
    from qconv.pipelines.hooks import attention_function

    lm = load_model(str(smollm2_hf), dtype="float32", device="cpu")
    ids = eval_windows(eval_text(wiki_path), lm.tokenizer, 512, 1)
    err = {"plain": 0.0, "hadamard": 0.0, "centered": 0.0}

    def measure(base, module, q, k, v, mask, **kw):  # q [1, 9, S, 64]; k, v [1, 3, S, 64]
        R, c = kv_rotation(64), (k.amin(dim=(0, 2)) + k.amax(dim=(0, 2)))[:, None] / 2  # c [3, 1, 64]
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        for name, (kq, vq) in {
                "plain": (kv_token_fake_quantize(k, 4), kv_token_fake_quantize(v, 4)),
                "hadamard": (kv_token_fake_quantize(k, 4, R), kv_token_fake_quantize(v, 4, R)),
                "centered": (kv_token_fake_quantize(k, 4, R, c, 1), kv_token_fake_quantize(v, 4, R, None, 1))}.items():
            o = F.scaled_dot_product_attention(q, kq, vq, is_causal=True, enable_gqa=True)
            err[name] += float((o - ref).pow(2).sum() / ref.pow(2).sum())
        return base(module, q, k, v, mask, **kw)

    with attention_function(lm.model, measure):
        block_by_block(lm, ids, torch.device("cpu"))(ids)
    assert err["plain"] > 1.5 * err["hadamard"] > 1.5 * err["centered"], err


@pytest.mark.parametrize("S", [1, 3, 40])  # 1, 3: attention over the codes; 40: dequantized for SDPA
def test_transformed_cache_attention_equals_float64_attention_over_what_it_reads_back(S):
    """Hadamard, K centers and a 2-position sink: attention runs in the rotated space and turns back; it equals
    attention over read() (x = x' R + c, the sink's positions as written), and scattered writes store the same."""
    g = torch.Generator().manual_seed(S)
    B, Hq, Hkv, L, D = 2, 6, 3, 45, 16
    kw = dict(online_bits=4, rot=kv_rotation(D), k_centers={0: torch.randn(Hkv, D, generator=g)}, sink=2)
    cache = KVCache(1, B, Hkv, 64, D, torch.float32, torch.device("cpu"), **kw)
    k, v = torch.randn(B, Hkv, L, D, generator=g) * 3 + 1, torch.randn(B, Hkv, L, D, generator=g)
    cache.write(0, torch.arange(L).expand(B, L), k, v, 0)
    kd, vd = cache.read(0, B, L)
    assert torch.allclose(kd[:, :, :2], k[:, :, :2], atol=1e-5) and torch.allclose(vd[:, :, :2], v[:, :, :2], atol=1e-5)
    assert (kd[:, :, 2:] - k[:, :, 2:]).abs().max() > 1e-2  # the rest are int4
    q = torch.randn(B, Hq, S, D, generator=g)
    pos = torch.stack([torch.arange(L - S - 5, L - 5), torch.arange(L - S, L)])
    mask = torch.arange(L)[None, None, None, :] <= pos[:, None, :, None]
    ref = cache_attention(q.double(), kd.double(), vd.double(), mask)
    assert (cache.attention(0, q, L, mask, False).double() - ref).abs().max() < 1e-5
    scattered = KVCache(1, B, Hkv, 64, D, torch.float32, torch.device("cpu"), **kw)
    for t in range(0, L, 7):  # row 1 a step behind row 0: positions differ between rows, no shared start
        p = torch.stack([torch.arange(t, min(t + 7, L)), torch.arange(t, min(t + 7, L))])
        scattered.write(0, p, k[:, :, t:t + 7], v[:, :, t:t + 7], None)
    for a, b in zip((cache.k, cache.kp, cache.sk, cache.sv), (scattered.k, scattered.kp, scattered.sk, scattered.sv)):
        assert torch.equal(a[0], b[0])


@pytest.fixture(scope="module")
def tiny_mode_ws(tiny_llama, tmp_path_factory):
    """{mode: workspace} of the tiny llama (int8-static with params from a short calibration)."""
    root = tmp_path_factory.mktemp("kvmodes")
    assert main(["calibrate", "--model", str(tiny_llama), "--work-dir", str(root / "w"), "--calib-samples", "2",
                 "--calib-seqlen", "64"]) == 0
    assert main(["kv-params", "--work-dir", str(root / "w")]) == 0
    out = {}
    for mode in MODES:
        extra = ["--kv-params", str(root / "w" / "kv_qparams.safetensors")] if mode == "int8-static" else []
        assert main(["convert", "--model", str(tiny_llama), "--dst-path", str(root / mode), "--weight-type", "fp32",
                     "--session-len", "256", "--kv", mode, *extra]) == 0
        out[mode] = root / mode
    assert main(["convert", "--model", str(tiny_llama), "--dst-path", str(root / "int4-c"), "--weight-type", "fp32",
                 "--session-len", "256", "--kv", "int4", "--kv-params", str(root / "w")]) == 0
    out["int4-c"] = root / "int4-c"  # int4 with K centers from the calibrate work dir, and a sink
    return out, root / "w" / "kv_qparams.safetensors"


def test_convert_names_the_mode_in_config_ini(tiny_mode_ws, tmp_path):
    ws, _ = tiny_mode_ws
    for mode, policy in zip(MODES, (0, 4, 0, 0)):
        cfg = WorkspaceConfig.read(ws[mode] / "config.ini")
        assert (cfg.kv_mode, cfg.quant_policy) == (mode, policy)
        # only int4 transforms (int8 stays as it was); without calibration it rotates, no center, no sink
        assert cfg.kv_transform == (KVTransform("hadamard") if mode == "int4" else KVTransform())
    cfg = WorkspaceConfig.read(ws["int4-c"] / "config.ini")
    assert (cfg.kv_mode, cfg.kv_rotation, cfg.kv_sink, cfg.kv_k_center) == ("int4", "hadamard", 1, True)
    centers = load_k_centers(ws["int4-c"] / "kv_center.safetensors", 2, 2, 16)
    stats = load_file(ws["int4-c"].parent / "w" / "key_stats.safetensors")  # c = K's mean after position 0
    assert torch.equal(centers[1], stats["layers.1.mean"])
    assert ((stats["layers.1.min"] <= centers[1]) & (centers[1] <= stats["layers.1.max"])).all()
    assert not torch.equal(centers[1], (stats["layers.1.min"] + stats["layers.1.max"]) / 2)
    # a work dir from before the mean: (min + max) / 2
    old = tmp_path / "old"
    old.mkdir()
    save_file({k: v for k, v in stats.items() if not k.endswith(".mean")}, old / "key_stats.safetensors")
    assert torch.equal(load_k_centers(old, 2, 2, 16)[1], (stats["layers.1.min"] + stats["layers.1.max"]) / 2)
    assert not (ws["int4"] / "kv_center.safetensors").exists()


@pytest.mark.parametrize("seqlen", [64, 12])  # 64: a prefill through SDPA; 12: attention over the codes
def test_runtime_ppl_equals_eval_fake_quant_for_every_mode(tiny_llama, tiny_mode_ws, wiki_path, run_cli, seqlen):
    ws, params = tiny_mode_ws
    ppl = {}
    for mode in MODES:
        extra = ["--kv-params", params] if mode == "int8-static" else []
        code, out, err = run_cli("eval", "--model", tiny_llama, "--dataset", wiki_path, "--windows", 2, "--seqlen",
                                 seqlen, "--kv", mode, *extra, "--json")
        assert code == 0, err
        fake = json.loads(out.splitlines()[0])["ppl"]
        code, out, err = run_cli("eval", ws[mode], "--dataset", wiki_path, "--windows", 2, "--seqlen", seqlen,
                                 "--dtype", "float32", "--json")
        assert code == 0, err
        runtime = json.loads(out.splitlines()[0])["ppl"]
        assert abs(runtime / fake - 1) < 1e-3, (mode, runtime, fake)
        ppl[mode] = runtime
    assert len(set(ppl.values())) == 4, ppl  # every mode really quantizes differently


@pytest.mark.parametrize("seqlen", [64, 12])
def test_runtime_ppl_equals_eval_for_int4_with_k_centers_and_sink(tiny_llama, tiny_mode_ws, wiki_path, run_cli,
                                                                  seqlen):
    """eval --kv int4 --kv-params W (the calibrate work dir) fake-quantizes as the workspace converted with them
    stores: K minus the centers, Hadamard, the first position kept."""
    ws, params = tiny_mode_ws
    code, out, err = run_cli("eval", "--model", tiny_llama, "--dataset", wiki_path, "--windows", 2, "--seqlen", seqlen,
                             "--kv", "int4", "--kv-params", params.parent, "--json")
    assert code == 0, err
    fake = json.loads(out.splitlines()[0])["ppl"]
    code, out, err = run_cli("eval", ws["int4-c"], "--dataset", wiki_path, "--windows", 2, "--seqlen", seqlen,
                             "--dtype", "float32", "--json")
    assert code == 0, err
    assert abs(json.loads(out.splitlines()[0])["ppl"] / fake - 1) < 1e-3


def test_old_workspace_without_kv_mode_reads_as_quant_policy_says(tiny_mode_ws, tmp_path):
    ws, _ = tiny_mode_ws
    text = (ws["int4-c"] / "config.ini").read_text()  # an int4 workspace from before the transform: plain int4
    (tmp_path / "config.ini").write_text("".join(l for l in text.splitlines(True)
                                                 if not l.startswith(("kv_rotation", "kv_sink", "kv_k_center"))))
    assert WorkspaceConfig.read(tmp_path / "config.ini").kv_transform == KVTransform()
    for mode, old in (("int8-static", "int8-static"), ("fp16", "fp16")):
        text = (ws[mode] / "config.ini").read_text()
        assert "kv_mode = " in text
        (tmp_path / "config.ini").write_text("".join(l for l in text.splitlines(True) if not l.startswith("kv_mode")))
        assert WorkspaceConfig.read(tmp_path / "config.ini").kv_mode == old


def test_engine_reports_bytes_per_token_and_admits_more_int4_tokens(tiny_mode_ws, monkeypatch):
    from qconv.runtime import engine as E

    ws, _ = tiny_mode_ws
    e4 = E.Engine.from_workspace(ws["int4"], device="cpu", dtype="float32", verify=False)
    cfg = e4.cfg  # 2 layers, 2 KV heads, head_dim 16
    assert e4.kv_bytes_per_token == 2 * 2 * 2 * (8 + 4) == e4.cache.nbytes() // cfg.session_len
    fp = E.Engine.from_workspace(ws["fp16"], device="cpu", dtype="float32", verify=False).kv_bytes_per_token
    assert fp == 2 * 2 * 2 * 16 * 4  # the fp16 mode stores the compute dtype, float32 here
    free = int(cfg.session_len * e4.kv_bytes_per_token * 1.1 / cfg.cache_max_entry_count)  # int4 fits, 10% spare
    monkeypatch.setattr(E, "_free_memory", lambda dev: free)
    E.Engine.from_workspace(ws["int4"], device="cpu", dtype="float32", verify=False)
    room = int(cfg.session_len * 1.1 * 48 / 256)  # fp32 tokens: 48 / 256 of int4's (52 < 256)
    with pytest.raises(QconvError, match=f"room for {room} tokens"):
        E.Engine.from_workspace(ws["fp16"], device="cpu", dtype="float32", verify=False)


def test_chat_verbose_prints_the_cache_bytes_per_token(tiny_mode_ws, run_cli):
    ws, _ = tiny_mode_ws
    code, out, err = run_cli("chat", ws["int8"], "--prompt", "Hi", "--max-new-tokens", 2, "--device", "cpu",
                             "--verbose")
    assert code == 0, err
    assert "KV cache int8: 160 bytes per token (params included)" in err


def test_unknown_kv_mode_in_config_ini_is_one_line(tiny_mode_ws, tmp_path, run_cli, wiki_path):
    import shutil

    ws = shutil.copytree(tiny_mode_ws[0]["int8"], tmp_path / "ws")
    text = (ws / "config.ini").read_text().replace("kv_mode = int8", "kv_mode = int2")
    (ws / "config.ini").write_text(text)
    code, _, err = run_cli("eval", ws, "--dataset", wiki_path, "--windows", 1, "--seqlen", 16)
    assert_one_line_error(code, err, "kv_mode 'int2' is not known to this qconv version")


def test_int4_on_an_odd_head_dim_is_one_line(tiny_mode_ws, tmp_path, run_cli, wiki_path):
    """transformers builds no llama-family model with an odd head_dim (rotary needs pairs), so the workspace says it:
    a config.ini that asks for int4 on 15 dims fails as it is read, before any weight."""
    import shutil

    cfg = WorkspaceConfig.read(tiny_mode_ws[0]["int4"] / "config.ini")
    with pytest.raises(QconvError, match="needs an even head_dim, got 15"):
        cfg.replace(size_per_head=15)
    ws = shutil.copytree(tiny_mode_ws[0]["int4"], tmp_path / "ws")
    (ws / "config.ini").write_text((ws / "config.ini").read_text().replace("size_per_head = 16", "size_per_head = 15"))
    code, _, err = run_cli("eval", ws, "--dataset", wiki_path, "--windows", 1, "--seqlen", 16)
    assert_one_line_error(code, err, "an int4 KV cache packs two codes per byte and needs an even head_dim, got 15")


def test_kv_params_with_an_online_mode_is_one_line(tiny_llama, tiny_mode_ws, tmp_path, run_cli):
    code, _, err = run_cli("convert", "--model", tiny_llama, "--dst-path", tmp_path / "ws", "--kv", "int8",
                           "--kv-params", tiny_mode_ws[1])
    assert_one_line_error(code, err, "--kv-params applies to --kv int8-static")


def test_bad_kv_transform_in_config_ini_is_one_line(tiny_mode_ws, tmp_path, run_cli, wiki_path):
    import shutil

    for old, new, needle in (("kv_rotation = hadamard", "kv_rotation = random", "kv_rotation must be one of none"),
                             ("kv_k_center = true", "kv_k_center = maybe", "kv_k_center = 'maybe' is not a valid")):
        ws = shutil.copytree(tiny_mode_ws[0]["int4-c"], tmp_path / new.split()[0])
        (ws / "config.ini").write_text((ws / "config.ini").read_text().replace(old, new))
        code, _, err = run_cli("eval", ws, "--dataset", wiki_path, "--windows", 1, "--seqlen", 16)
        assert_one_line_error(code, err, needle)
    (ws / "config.ini").write_text((tiny_mode_ws[0]["int4-c"] / "config.ini").read_text())
    (ws / "kv_center.safetensors").unlink()  # the manifest check names it; without that check, the loader does
    from qconv.runtime.loader import load_workspace
    from qconv.runtime.options import RuntimeOptions

    with pytest.raises(QconvError, match="kv_k_center = true but there is no kv_center.safetensors"):
        load_workspace(ws, RuntimeOptions(device="cpu", verify=False))
    with pytest.raises(QconvError, match="apply to the online modes"):
        WorkspaceConfig.read(tiny_mode_ws[0]["int8-static"] / "config.ini").replace(kv_sink=1)
