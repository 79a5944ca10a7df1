"""Calibration data: the bundled C4, local file formats, hf: specs offline, and windowing."""
import gzip
import json

import pytest
import torch
from transformers import AutoTokenizer

from qconv import QconvError
from qconv.pipelines.data import calib_windows, eval_text, load_texts


def test_bundled_c4_is_real_and_complete():
    texts = load_texts("c4")
    assert len(texts) == 578 and len(set(texts)) == 578
    assert sum(len(t) for t in texts) > 1_000_000


def test_local_formats(tmp_path):
    docs = ["first document here", "second one"]
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n\n")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    (tmp_path / "a.json").write_text(json.dumps([{"text": d} for d in docs]))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": d}) for d in docs))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    for name in ("a.txt", "a.jsonl", "a.json", "a.jsonl.gz", "a.parquet"):
        assert load_texts(str(tmp_path / name)) == docs, name


def test_jsonl_without_text_field(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"content": "x"}))
    with pytest.raises(QconvError, match="no 'text' field"):
        load_texts(str(tmp_path / "b.jsonl"))


def test_hf_spec_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QconvError, match="local"):
        load_texts("hf:qconv-no-such/dataset:train")
    with pytest.raises(QconvError, match="hf:NAME:SPLIT"):
        load_texts("hf:onlyname")


def test_windows_are_deterministic_and_eos_joined(smollm2_hf):
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    texts = load_texts("c4")
    a = calib_windows(texts, tok, 4, 256, seed=0)
    b = calib_windows(texts, tok, 4, 256, seed=0)
    c = calib_windows(texts, tok, 4, 256, seed=1)
    assert a.shape == (4, 256) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a == tok.eos_token_id).any()


def test_short_data_uses_what_there_is(smollm2_hf, tmp_path):
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    msgs = []
    ids = calib_windows(["word " * 300], tok, 8, 100, log=msgs.append)
    assert ids.shape[0] == 3 and "fills only 3 of 8 windows" in msgs[0]
    with pytest.raises(QconvError, match="less than one window"):
        calib_windows(["tiny"], tok, 1, 100)


def test_eval_text_drops_doc_markers(tmp_path):
    (tmp_path / "w.txt").write_text('<doc id="1" title="x">\nTitle\n\nBody text.\n</doc>\n<doc id="2">\nMore\n</doc>\n')
    assert eval_text(str(tmp_path / "w.txt")) == "Title\n\nBody text.\nMore\n"
