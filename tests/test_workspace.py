"""`qconv convert`: workspace layout, config.ini schema, manifest, int4/int8 sources, KV params, bad input."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qconv import QconvError
from qconv.convert import layout as L
from qconv.convert import quant as Q
from qconv.convert.arch import ARCHS
from qconv.convert.awq_export import W8_METHOD
from qconv.convert.workspace_config import WorkspaceConfig
from qconv.runtime.engine import Engine
from qconv.runtime.cpu.linear import Int4Linear

GROUP = 32


def assert_one_line_error(code, err, needle):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qconv: error:"), err
    assert "Traceback" not in err and needle in lines[0], lines[0]


# ----------------------------------------------------------------------------------------------
# RTN checkpoints of a tiny model in the AutoAWQ GEMM and GPTQ formats, built with convert/quant.py
# ----------------------------------------------------------------------------------------------
def rtn_codes(w, bits=4, sym=False):
    scale, zero = Q.group_qparams(w.float(), bits, GROUP, sym)
    scale = scale.half().float()  # the stored precision
    return Q.quantize(w.float(), scale, zero, bits, sym), scale, zero


def pack_sequential(codes):
    """int codes [rows, cols] -> int32 [rows/8, cols], nibble j of row r = codes[8r + j] (GPTQ order)."""
    c = codes.to(torch.int64).reshape(codes.shape[0] // 8, 8, -1)
    packed = (c << (4 * torch.arange(8))[None, :, None]).sum(1)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def rtn_checkpoint(src, dst, fmt):
    """(checkpoint folder, {linear name: dequantized weight})."""
    state = load_file(str(src / "model.safetensors"))
    spec = ARCHS[json.loads((src / "config.json").read_text())["model_type"]]
    out, deq = {}, {}
    for name, t in state.items():
        base = name[: -len(".weight")]
        if not (name.endswith(".weight") and base.split(".", 3)[-1] in spec.linears):
            out[name] = t.half()
            continue
        q, scale, zero = rtn_codes(t, 8, True) if fmt == "w8" else rtn_codes(t)
        deq[base] = Q.dequantize(q, scale, zero)
        if fmt == "w8":  # qconv awq --w-bits 8: qweight int8 [out, in], scales [out, in/g]
            out[f"{base}.qweight"], out[f"{base}.scales"] = q.to(torch.int8), scale.half()
        elif fmt == "awq":
            for k, v in Q.awq_pack(q, scale, zero).items():
                out[f"{base}.{k}"] = v
        else:  # GPTQ: qweight [in/8, out], qzeros hold zero - 1, packed along out
            out[f"{base}.qweight"] = pack_sequential(q.t().contiguous())
            out[f"{base}.qzeros"] = pack_sequential(zero - 1).t().contiguous()  # [in/g, out/8]
            out[f"{base}.scales"] = scale.t().contiguous().half()
            out[f"{base}.g_idx"] = torch.arange(q.shape[1], dtype=torch.int32) // GROUP
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {
        "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None},
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": False},
        "w8": {"quant_method": W8_METHOD, "bits": 8, "group_size": GROUP, "sym": True}}[fmt]
    cfg["dtype"] = "float16"
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            (dst / f.name).write_bytes(f.read_bytes())
    return dst, deq


def dequantized_reference(src, deq):
    """The tiny model with the checkpoint's weights: linears dequantized, the rest rounded to fp16."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    sd = {k: v.half().float() for k, v in model.state_dict().items()}
    sd.update({f"{k}.weight": v for k, v in deq.items()})
    model.load_state_dict(sd)
    return model.eval()


@pytest.mark.parametrize("arch,fmt", [("llama", "awq"), ("qwen2", "gptq"), ("qwen2", "w8")])
def test_quantized_checkpoint_gives_the_dequantized_models_logits(arch, fmt, make_tiny, tmp_path, run_cli):
    src = make_tiny(arch, seed=3)
    ckpt, deq = rtn_checkpoint(src, tmp_path / fmt, fmt)
    code, _, err = run_cli("convert", "--model", ckpt, "--dst-path", tmp_path / "ws", "--session-len", 128)
    assert code == 0, err
    cfg = WorkspaceConfig.read(tmp_path / "ws" / "config.ini")
    wt = "int8" if fmt == "w8" else "int4"
    assert (cfg.weight_type, cfg.group_size, cfg.attn_bias) == (wt, GROUP, arch == "qwen2")
    layer = load_file(str(tmp_path / "ws" / "weights" / L.layer_file(0)))
    qkv = layer["attention.wqkv.qweight"]  # [(Hq + 2 Hkv) D, in/2] uint8 (int4) or [.., in] int8
    assert (qkv.dtype, tuple(qkv.shape)) == ((torch.int8, (128, 64)) if wt == "int8" else (torch.uint8, (128, 32)))
    assert tuple(layer["feed_forward.w13.scales"].shape) == (2 * 128, 64 // GROUP)
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dequantized_reference(src, deq)(ids).logits
    got = Engine.from_workspace(tmp_path / "ws", device="cpu", dtype="float32").logits(ids)  # exact path
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    if wt == "int8":
        return
    # bf16 on CPU runs the packed codes through torch's int4 kernel: same model, bf16 rounding
    bf16 = Engine.from_workspace(tmp_path / "ws", device="cpu", dtype="bfloat16")
    assert all(isinstance(b.wqkv, Int4Linear) and isinstance(b.w2, Int4Linear) for b in bf16.model.layers)
    assert (bf16.logits(ids) - ref).abs().max() <= 3e-2 * ref.abs().max()


def test_rtn_int4_from_float_weights_equals_the_awq_checkpoint(tiny_llama, tmp_path, run_cli):
    ckpt, _ = rtn_checkpoint(tiny_llama, tmp_path / "awq", "awq")
    assert run_cli("convert", "--model", ckpt, "--dst-path", tmp_path / "a", "--session-len", 64)[0] == 0
    assert run_cli("convert", "--model", tiny_llama, "--dst-path", tmp_path / "b", "--session-len", 64,
                   "--weight-type", "int4", "--group-size", GROUP)[0] == 0
    for f in ("global.safetensors", "layers.0.safetensors", "layers.1.safetensors"):
        a, b = load_file(str(tmp_path / "a" / "weights" / f)), load_file(str(tmp_path / "b" / "weights" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_int8_weights_are_per_channel_round_to_nearest(tiny_llama, tmp_path, run_cli):
    assert run_cli("convert", "--model", tiny_llama, "--dst-path", tmp_path / "ws", "--weight-type", "int8",
                   "--session-len", 64)[0] == 0
    t = load_file(str(tmp_path / "ws" / "weights" / L.layer_file(1)))
    w = load_file(str(tiny_llama / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    assert t["feed_forward.w2.qweight"].dtype == torch.int8 and t["feed_forward.w2.scales"].shape == (64, 1)
    back = L.read_int8({"qweight": t["feed_forward.w2.qweight"], "scales": t["feed_forward.w2.scales"]}).dequantize()
    assert (back - w).abs().max() <= w.abs().amax(1).max() / 127  # |w - q s| <= s / 2 per row, s = absmax / 127


# ----------------------------------------------------------------------------------------------
# Layout, schema, manifest
# ----------------------------------------------------------------------------------------------
def test_int4_packing_by_hand():
    codes = torch.tensor([[1, 2, 3, 15], [0, 0, 9, 4]])
    packed = L.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0x21, 0xF3], [0x00, 0x49]]  # low nibble = even column
    assert torch.equal(L.unpack_int4(packed), codes)


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory, tiny_llama):
    from qconv.cli import main

    ws = tmp_path_factory.mktemp("ws") / "tiny"
    assert main(["convert", "--model", str(tiny_llama), "--dst-path", str(ws), "--session-len", "32",
                 "--max-batch-size", "2"]) == 0
    return ws


def test_layout_config_and_manifest(tiny_ws):
    files = sorted(p.relative_to(tiny_ws).as_posix() for p in tiny_ws.rglob("*") if p.is_file())
    assert {"config.ini", "manifest.json", "weights/global.safetensors", "weights/layers.0.safetensors",
            "weights/layers.1.safetensors", "tokenizer/tokenizer.json", "tokenizer/chat_template.jinja",
            "tokenizer/generation_config.json"} <= set(files)
    manifest = json.loads((tiny_ws / "manifest.json").read_text())
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]
    assert all(e["size"] == (tiny_ws / f).stat().st_size for f, e in manifest["files"].items())
    cfg = WorkspaceConfig.read(tiny_ws / "config.ini")
    assert (cfg.head_num, cfg.kv_head_num, cfg.size_per_head, cfg.num_layer, cfg.inter_size) == (4, 2, 16, 2, 128)
    assert cfg.weight_type == "fp32" and cfg.quant_policy == 0 and cfg.attn_bias is False
    assert cfg.end_id == (2,) and cfg.start_id == 1 and cfg.session_len == 32 and cfg.max_batch_size == 2
    text = (tiny_ws / "config.ini").read_text()
    assert "[llama]" in text and "attn_bias = false" in text and "end_id = 2" in text


def test_config_ini_round_trip_and_typed_errors(tiny_ws, tmp_path):
    cfg = WorkspaceConfig.read(tiny_ws / "config.ini")
    cfg.replace(end_id=(2, 7), kv_sym=True).write(tmp_path / "config.ini")
    back = WorkspaceConfig.read(tmp_path / "config.ini")
    assert back.end_id == (2, 7) and back.kv_sym is True and back == cfg.replace(end_id=(2, 7), kv_sym=True)
    text = (tmp_path / "config.ini").read_text()
    for bad, needle in [(text.replace("kv_sym = true", "kv_sym = maybe"), "kv_sym = 'maybe' is not a valid bool"),
                        (text.replace("head_num = 4\n", "head_num = 3\n"), "not a multiple of kv_head_num"),
                        (text + "colour = red\n", "unknown key 'colour'")]:
        (tmp_path / "config.ini").write_text(bad)
        with pytest.raises(QconvError, match=needle):
            WorkspaceConfig.read(tmp_path / "config.ini")


def test_existing_destination_needs_force(tiny_llama, tiny_ws, run_cli):
    code, _, err = run_cli("convert", "--model", tiny_llama, "--dst-path", tiny_ws)
    assert_one_line_error(code, err, "--force")


def test_kv_params_install_sets_policy_and_manifest(tiny_ws, tmp_path, run_cli):
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(tiny_ws, ws)
    params = {f"layers.{i}.{n}": torch.full((2,), 0.05 if "scale" in n else 0.0) for i in range(2)
              for n in ("k_scale", "k_zp", "v_scale", "v_zp")}
    save_file(params, str(tmp_path / "kv.safetensors"))
    from qconv.convert.workspace import install_kv_params

    install_kv_params(ws, tmp_path / "kv.safetensors")
    cfg = WorkspaceConfig.read(ws / "config.ini")
    assert cfg.quant_policy == 4 and cfg.kv_sym is True  # zp = 0 everywhere
    engine = Engine.from_workspace(ws, device="cpu")  # the manifest still verifies
    assert engine.cache.k[0].dtype == torch.int8


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, no traceback
# ----------------------------------------------------------------------------------------------
def test_empty_directory(tmp_path, run_cli, wiki_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli("chat", tmp_path / "empty", "--prompt", "hi")
    assert_one_line_error(code, err, "not a qconv workspace (no config.ini)")
    code, _, err = run_cli("eval", "--model", tmp_path / "empty", "--dataset", wiki_path)
    assert_one_line_error(code, err, "no config.json")  # not a workspace: read as a model folder


def test_config_ini_missing_a_key(tiny_ws, tmp_path, run_cli):
    import shutil

    shutil.copytree(tiny_ws, tmp_path / "ws")
    ini = tmp_path / "ws" / "config.ini"
    ini.write_text("".join(l for l in ini.read_text().splitlines(True) if not l.startswith("session_len")))
    code, _, err = run_cli("chat", tmp_path / "ws", "--prompt", "hi")
    assert_one_line_error(code, err, "missing the key 'session_len'")


def test_weight_file_truncated_by_one_byte(tiny_ws, tmp_path, run_cli):
    import shutil

    shutil.copytree(tiny_ws, tmp_path / "ws")
    f = tmp_path / "ws" / "weights" / "layers.1.safetensors"
    f.write_bytes(f.read_bytes()[:-1])
    code, _, err = run_cli("chat", tmp_path / "ws", "--prompt", "hi")
    assert_one_line_error(code, err, "weights/layers.1.safetensors is truncated")
    code, _, err = run_cli("chat", tmp_path / "ws", "--prompt", "hi", "--no-verify")
    assert_one_line_error(code, err, "corrupt or truncated")
    assert "layers.1.safetensors" in err


def test_altered_file_is_named(tiny_ws, tmp_path, run_cli):
    import shutil

    shutil.copytree(tiny_ws, tmp_path / "ws")
    f = tmp_path / "ws" / "tokenizer" / "chat_template.jinja"
    f.write_text(f.read_text().replace("<|im_start|>", "<|im_begin|>"))
    code, _, err = run_cli("chat", tmp_path / "ws", "--prompt", "hi")
    assert_one_line_error(code, err, "tokenizer/chat_template.jinja was altered")


def test_kv_params_with_wrong_head_count(tiny_ws, tiny_llama, tmp_path, run_cli):
    params = {f"layers.{i}.{n}": torch.ones(3) for i in range(2) for n in ("k_scale", "k_zp", "v_scale", "v_zp")}
    save_file(params, str(tmp_path / "kv.safetensors"))
    code, _, err = run_cli("convert", "--model", tiny_llama, "--dst-path", tmp_path / "ws",
                           "--kv-params", tmp_path / "kv.safetensors")
    assert_one_line_error(code, err, "2 KV heads")
    assert not (tmp_path / "ws").exists()
    from qconv.convert.workspace import install_kv_params

    with pytest.raises(QconvError, match="do not fit this model"):
        install_kv_params(tiny_ws, tmp_path / "kv.safetensors")
    assert WorkspaceConfig.read(tiny_ws / "config.ini").quant_policy == 0


def test_quant_policy_4_without_kv_params(tiny_llama, tmp_path, run_cli):
    code, _, err = run_cli("convert", "--model", tiny_llama, "--dst-path", tmp_path / "ws", "--quant-policy", 4)
    assert_one_line_error(code, err, "needs --kv-params")
    assert not (tmp_path / "ws").exists()


def test_session_len_smaller_than_the_prompt(tiny_ws, run_cli):
    code, _, err = run_cli("chat", tiny_ws, "--prompt", "word " * 40)
    assert_one_line_error(code, err, "session_len is 32")


def test_model_format_that_does_not_match(tiny_llama, tmp_path, run_cli):
    ckpt, _ = rtn_checkpoint(tiny_llama, tmp_path / "awq", "awq")
    code, _, err = run_cli("convert", "--model", ckpt, "--dst-path", tmp_path / "ws", "--model-format", "gptq")
    assert_one_line_error(code, err, "does not match this checkpoint")


def test_group_size_that_does_not_divide(tiny_llama, tmp_path, run_cli):
    code, _, err = run_cli("convert", "--model", tiny_llama, "--dst-path", tmp_path / "ws", "--weight-type", "int4",
                           "--group-size", 48)
    assert_one_line_error(code, err, "group_size 48 does not divide")


def test_existing_destination_fails_before_anything_loads(smollm2_gguf, tiny_ws):
    """The check runs before torch is imported or the model read (a GGUF would first be converted)."""
    import subprocess
    import sys
    import time

    probe = ("import sys; from qconv.cli import main; code = main(sys.argv[1:]); "
             "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", probe, "convert", "--model", smollm2_gguf, "--dst-path", tiny_ws],
                       capture_output=True, text=True, timeout=60)
    seconds = time.monotonic() - t0
    assert_one_line_error(r.returncode, r.stderr, "already exists")
    assert seconds < 5, f"took {seconds:.1f}s"
