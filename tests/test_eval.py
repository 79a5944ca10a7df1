"""`qconv eval`: protocol perplexity, with and without int8 KV fake-quantization."""
import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qconv.convert.perplexity import eval_windows
from qconv.pipelines.data import eval_text
from qconv.pipelines.eval import eval_model


def test_ppl_matches_a_direct_hf_loss(tiny_llama, wiki_path):
    r = eval_model(str(tiny_llama), str(wiki_path), seqlen=64, windows=3, device="cpu")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ids = torch.tensor(tok(eval_text(str(wiki_path)))["input_ids"][: 3 * 64]).reshape(3, 64)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in ids]  # mean over 63 tokens
    assert r.tokens == 3 * 63 and r.windows == 3
    assert math.isclose(r.ppl, math.exp(sum(losses) / 3), rel_tol=1e-5)


def test_eval_windows_start_at_token_zero(smollm2_hf, wiki_path):
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    text = eval_text(str(wiki_path))
    w = eval_windows(text, tok, 128, 2)
    assert w.shape == (2, 128)
    assert w.flatten().tolist() == tok(text)["input_ids"][:256]


def test_kv_int8_on_smollm2_costs_little(smollm2_gguf, wiki_path, tmp_path, run_cli):
    assert run_cli("calibrate", "--model", smollm2_gguf, "--work-dir", tmp_path, "--calib-samples", 8,
                   "--calib-seqlen", 512)[0] == 0
    assert run_cli("kv-params", "--work-dir", tmp_path)[0] == 0
    base = ["eval", "--model", smollm2_gguf, "--dataset", wiki_path, "--windows", 2, "--seqlen", 512, "--json"]
    code, out, err = run_cli(*base)
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("ppl ")
    fp = json.loads(out.strip().splitlines()[0])
    code, out, err = run_cli(*base, "--kv-params", tmp_path / "kv_qparams.safetensors")
    assert code == 0, err
    kv = json.loads(out.strip().splitlines()[0])
    assert kv["tokens"] == fp["tokens"] == 2 * 511
    # int8 KV changes the numbers, but by little
    assert kv["ppl"] != fp["ppl"]
    assert abs(kv["ppl"] / fp["ppl"] - 1) < 0.03
