"""Every bad input gets one line on stderr, exit code 2, no traceback, and nothing written."""
import json

import pytest


def assert_one_line_error(code, err, needle):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qconv: error:"), err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]


def calib(run_cli, model, work, *extra):
    return run_cli("calibrate", "--model", model, "--work-dir", work, "--calib-samples", 1, "--calib-seqlen", 16,
                   *extra)


def test_missing_model_path(tmp_path, run_cli):
    code, _, err = calib(run_cli, tmp_path / "nope", tmp_path / "w")
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "w").exists()


def test_folder_without_config(tmp_path, run_cli):
    (tmp_path / "m").mkdir()
    code, _, err = calib(run_cli, tmp_path / "m", tmp_path / "w")
    assert_one_line_error(code, err, "no config.json")
    assert not (tmp_path / "w").exists()


def test_unsupported_architecture(tmp_path, run_cli):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    code, _, err = calib(run_cli, tmp_path / "gpt2", tmp_path / "w")
    assert_one_line_error(code, err, "llama, mistral, qwen2, qwen3")
    assert "'gpt2'" in err and not (tmp_path / "w").exists()


@pytest.mark.parametrize("name,content", [("empty.txt", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]")])
def test_empty_dataset(name, content, tiny_llama, tmp_path, run_cli):
    (tmp_path / name).write_text(content)
    code, _, err = calib(run_cli, tiny_llama, tmp_path / "w", "--calib-dataset", tmp_path / name)
    assert_one_line_error(code, err, "no text")
    assert not (tmp_path / "w").exists()


def test_zero_seqlen(tiny_llama, tmp_path, run_cli):
    code, _, err = run_cli("calibrate", "--model", tiny_llama, "--work-dir", tmp_path / "w", "--calib-seqlen", 0)
    assert_one_line_error(code, err, "--calib-seqlen")
    assert not (tmp_path / "w").exists()


def test_eval_kv_params_from_other_model(tiny_llama, make_tiny, tmp_path, run_cli, wiki_path):
    other = make_tiny("llama", num_hidden_layers=3)
    assert calib(run_cli, other, tmp_path / "w")[0] == 0
    assert run_cli("kv-params", "--work-dir", tmp_path / "w")[0] == 0
    code, _, err = run_cli("eval", "--model", tiny_llama, "--dataset", wiki_path, "--windows", 1, "--seqlen", 64,
                           "--kv-params", tmp_path / "w" / "kv_qparams.safetensors")
    assert_one_line_error(code, err, "do not fit this model")
    code, _, err = run_cli("eval", "--model", tiny_llama, "--dataset", wiki_path, "--windows", 1, "--seqlen", 64,
                           "--kv-params", tmp_path / "w")
    assert_one_line_error(code, err, "different model")


def test_truncated_stats_file(tiny_llama, tmp_path, run_cli):
    assert calib(run_cli, tiny_llama, tmp_path)[0] == 0
    f = tmp_path / "key_stats.safetensors"
    f.write_bytes(f.read_bytes()[:-1])
    code, _, err = run_cli("kv-params", "--work-dir", tmp_path)
    assert_one_line_error(code, err, "corrupt or truncated")


def test_corrupt_calibrate_record(tiny_llama, tmp_path, run_cli):
    assert calib(run_cli, tiny_llama, tmp_path)[0] == 0
    (tmp_path / "calibrate.json").write_text("{not json")
    code, _, err = run_cli("kv-params", "--work-dir", tmp_path)
    assert_one_line_error(code, err, "not valid JSON")
    json.loads  # the file is left as the user has it
    assert (tmp_path / "calibrate.json").read_text() == "{not json"


def test_dataset_that_is_not_utf8(tiny_llama, tmp_path, run_cli):
    bad = tmp_path / "bad.txt"
    bad.write_bytes("Caf\u00e9 au lait, deux fois.\n".encode("latin-1") * 50)
    code, _, err = calib(run_cli, tiny_llama, tmp_path / "w", "--calib-dataset", bad)
    assert_one_line_error(code, err, "not UTF-8")
    assert "0xe9" in err and not (tmp_path / "w").exists()
    code, _, err = run_cli("eval", "--model", tiny_llama, "--dataset", bad, "--windows", 1, "--seqlen", 16)
    assert_one_line_error(code, err, "not UTF-8")
