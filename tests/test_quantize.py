"""`qconv quantize`: the one-shot pipeline into a workspace that chats, and its skipping of finished stages."""
import configparser


def test_quantize_then_chat_and_rerun_skips(make_tiny, tmp_path, run_cli):
    model = make_tiny("llama", hidden_size=128, intermediate_size=256)
    ws, work = tmp_path / "ws", tmp_path / "work"
    args = ["quantize", "--model", model, "--dst-path", ws, "--work-dir", work, "--w-group-size", 64,
            "--calib-samples", 2, "--calib-seqlen", 64, "--device", "cpu"]
    code, out, err = run_cli(*args)
    assert code == 0, err
    ini = configparser.ConfigParser()
    ini.read(ws / "config.ini")
    assert ini["llama"]["weight_type"] == "int4" and ini["llama"]["quant_policy"] == "4"
    assert ini["llama"]["model_name"] == model.name  # the source model, not the intermediate awq_checkpoint
    assert (ws / "kv_qparams.safetensors").is_file() and (work / "awq_checkpoint" / "awq.json").is_file()
    code, out, err = run_cli("chat", ws, "--prompt", "Hello", "--max-new-tokens", 4, "--device", "cpu")
    assert code == 0 and out.strip(), err
    code, out, err = run_cli(*args)
    assert code == 0 and "skipping" in out


def test_quantize_refuses_a_foreign_destination(tiny_llama, tmp_path, run_cli):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "notes.txt").write_text("mine")
    code, _, err = run_cli("quantize", "--model", tiny_llama, "--dst-path", tmp_path / "ws", "--calib-samples", 1,
                           "--calib-seqlen", 32)
    assert code == 2 and "not a workspace" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "ws" / "notes.txt").read_text() == "mine"


def test_quantize_kv_int4_calibrates_k_centers_and_chats(make_tiny, tmp_path, run_cli):
    """--kv int4: calibrate runs for the K centers (no kv-params stage), and the workspace holds them."""
    model = make_tiny("llama", hidden_size=128, intermediate_size=256)
    ws, work = tmp_path / "ws", tmp_path / "work"
    code, out, err = run_cli("quantize", "--model", model, "--dst-path", ws, "--work-dir", work, "--w-group-size", 64,
                             "--calib-samples", 2, "--calib-seqlen", 64, "--device", "cpu", "--kv", "int4")
    assert code == 0, err
    ini = configparser.ConfigParser()
    ini.read(ws / "config.ini")
    cfg = ini["llama"]
    assert (cfg["kv_mode"], cfg["kv_rotation"], cfg["kv_sink"], cfg["kv_k_center"]) == ("int4", "hadamard", "1", "true")
    assert (ws / "kv_center.safetensors").is_file() and not (ws / "kv_qparams.safetensors").exists()
    code, out, err = run_cli("chat", ws, "--prompt", "Hello", "--max-new-tokens", 4, "--device", "cpu")
    assert code == 0 and out.strip(), err
