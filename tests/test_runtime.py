"""The bundled runtime against transformers: logits, generation, per-row cache positions, int8 KV, sampling."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from qconv import QconvError
from qconv.cli import main
from qconv.convert.workspace_config import WorkspaceConfig
from qconv.runtime import sampling as S
from qconv.runtime.engine import Engine
from qconv.runtime.generation import GenerationConfig

GREEDY = GenerationConfig(max_new_tokens=8, temperature=0.0, stop_ids=())


def convert(model, dst, *extra):
    assert main(["convert", "--model", str(model), "--dst-path", str(dst), *map(str, extra)]) == 0
    return dst


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def random_ids(n, seed=0, vocab=49152):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def tiny_qwen3(folder, tokenizer_dir):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = AutoConfig.for_model("qwen3", vocab_size=len(tok), hidden_size=64, intermediate_size=128, head_dim=16,
                               num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random q/k norm weights, so that applying them (or not) shows in the logits
    for layer in model.model.layers:
        layer.self_attn.q_norm.weight.data.uniform_(0.5, 1.5)
        layer.self_attn.k_norm.weight.data.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0}
CASES = {
    "llama-fp32": ("llama", {}, "fp32"),
    "qwen2-fp16": ("qwen2", {}, "fp16"),
    "llama-llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE, "max_position_embeddings": 256}, "fp32"),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "fp32"),
    "qwen3-tied": ("qwen3", {}, "fp32"),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_and_greedy_tokens_match_transformers(case, make_tiny, smollm2_hf, tmp_path):
    arch, overrides, wt = CASES[case]
    src = tiny_qwen3(tmp_path / "src", smollm2_hf) if arch == "qwen3" else make_tiny(arch, seed=1, **overrides)
    ws = convert(src, tmp_path / "ws", "--weight-type", wt, "--session-len", 128)
    ref_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    if wt == "fp16":  # the same weights as the workspace, computed in fp32
        ref_model = ref_model.half().float()
    engine = Engine.from_workspace(ws, device="cpu")
    ids = random_ids(70)  # past original_max_position_embeddings of the llama3 case
    with torch.no_grad():
        ref = ref_model(ids).logits
        want = ref_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                  min_new_tokens=8, pad_token_id=0)[0, 70:].tolist()
    assert rel_err(engine.logits(ids), ref) <= 1e-3
    # decode step by step through the cache gives transformers' greedy tokens
    assert list(engine.generate(ids[0].tolist(), GREEDY)) == want


@pytest.fixture(scope="module")
def smol_ws(tmp_path_factory, smollm2_hf):
    return convert(smollm2_hf, tmp_path_factory.mktemp("smol") / "fp", "--weight-type", "fp16", "--session-len", 512)


def test_smollm2_logits_match_transformers(smollm2_hf, smol_ws):
    ws = smol_ws
    cfg = WorkspaceConfig.read(ws / "config.ini")
    assert (cfg.num_layer, cfg.hidden_units, cfg.head_num, cfg.kv_head_num, cfg.tie_word_embeddings) == \
        (30, 576, 9, 3, True)
    ids = random_ids(48, seed=2)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float16).float()(ids).logits
    assert rel_err(Engine.from_workspace(ws, device="cpu").logits(ids), ref) <= 1e-3


def test_kv_int8_workspace_ppl_within_1pct_on_smollm2(smollm2_hf, smol_ws, wiki_path, tmp_path, run_cli):
    assert run_cli("calibrate", "--model", smollm2_hf, "--work-dir", tmp_path / "w", "--calib-samples", 2,
                   "--calib-seqlen", 512)[0] == 0
    shutil.copytree(smol_ws, tmp_path / "kv")
    code, _, err = run_cli("kv-params", "--work-dir", tmp_path / "w", "--workspace", tmp_path / "kv")
    assert code == 0, err
    assert WorkspaceConfig.read(tmp_path / "kv" / "config.ini").quant_policy == 4
    ppl = {}
    for name, ws in (("fp", smol_ws), ("kv", tmp_path / "kv")):
        code, out, err = run_cli("eval", "--model", ws, "--dataset", wiki_path, "--windows", 2,
                                 "--seqlen", 512, "--json")
        assert code == 0, err
        ppl[name] = json.loads(out.splitlines()[0])
    assert ppl["fp"]["tokens"] == ppl["kv"]["tokens"] == 2 * 511
    assert ppl["kv"]["ppl"] != ppl["fp"]["ppl"]  # the cache really is int8
    assert abs(ppl["kv"]["ppl"] / ppl["fp"]["ppl"] - 1) < 0.01


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_int8_cache_attention_equals_attention_over_the_dequantized_cache(dtype, tol):
    """The CPU path attends over int8 codes (K's scale folded into q, its zero point dropped by the softmax, V's
    applied to the output): against softmax over x = c * scale + zp in float64, with GQA (every kv head its
    own params, so a wrong head mapping shows), a causal mask and two query positions."""
    from qconv.runtime.kv_cache import cache_attention

    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, S, L, D = 2, 6, 3, 2, 37, 16
    codes = [torch.randint(-128, 128, (B, Hkv, L, D), generator=g, dtype=torch.int8) for _ in range(2)]
    ks, vs = (torch.rand(Hkv, generator=g) * 0.05 + 0.01 for _ in range(2))
    kz, vz = (torch.randn(Hkv, generator=g) for _ in range(2))
    params = tuple(p[None, :, None, None] for p in (ks, kz, vs, vz))
    q = torch.randn(B, Hq, S, D, generator=g)
    pos = torch.tensor([[20, 21], [35, 36]])  # row 0 sees fewer keys
    mask = torch.arange(L)[None, None, None, :] <= pos[:, None, :, None]  # [B, 1, S, L]
    k, v = (c.double() * p[0] + p[1] for c, p in ((codes[0], params[:2]), (codes[1], params[2:])))
    k, v = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k, v))
    scores = (q.double() @ k.transpose(-1, -2)) / D ** 0.5
    ref = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v
    out = cache_attention(q.to(dtype), codes[0], codes[1], mask, qparams=params)
    assert out.dtype == dtype
    assert rel_err(out.double(), ref) < tol


def test_workspace_eval_equals_model_eval(tiny_llama, wiki_path, tmp_path, run_cli):
    ws = convert(tiny_llama, tmp_path / "ws", "--session-len", 64)
    outs = [run_cli("eval", "--model", m, "--dataset", wiki_path, "--windows", 2, "--seqlen", 64, "--json")[1]
            for m in (tiny_llama, ws)]
    results = [json.loads(next(line for line in o.splitlines() if line.startswith("{"))) for o in outs]
    assert abs(results[0]["ppl"] / results[1]["ppl"] - 1) < 1e-5


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory, tiny_llama):
    ws = convert(tiny_llama, tmp_path_factory.mktemp("ws") / "ws", "--session-len", 24, "--max-batch-size", 2)
    return Engine.from_workspace(ws, device="cpu", batch_size=2)


def test_rows_of_a_batch_are_separate_sequences(tiny_engine):
    a, b = random_ids(5, seed=4)[0], random_ids(3, seed=5)[0]
    want_a, want_b = tiny_engine.logits(a[None])[0, -1], tiny_engine.logits(b[None])[0, -1]
    m, cache = tiny_engine.model, tiny_engine.cache
    # prefill 4 tokens per row (row b's 3rd and 4th are junk), then row a continues at 4 while row b
    # overwrites position 2: row b must not see its junk at position 3
    junk = torch.tensor([7, 7])
    m(torch.stack([a[:4], torch.cat([b[:2], junk])]), torch.arange(4).expand(2, 4), cache)
    logits = m(torch.stack([a[4:5], b[2:3]]), torch.tensor([[4], [2]]), cache).float()
    assert rel_err(logits[0, -1], want_a) < 1e-5 and rel_err(logits[1, -1], want_b) < 1e-5


def test_prefix_reuse_gives_the_same_answer(tiny_engine):
    prompt = random_ids(10, seed=6)[0].tolist()
    first = list(tiny_engine.generate(prompt, GREEDY))
    follow = prompt + first + [5, 6]
    again = list(tiny_engine.generate(follow, GREEDY))
    assert tiny_engine.last_stats.reused_tokens >= len(prompt)
    tiny_engine.reset()
    assert list(tiny_engine.generate(follow, GREEDY)) == again and tiny_engine.last_stats.reused_tokens == 0


def test_generate_batch_answers_each_prompt_as_generate_does(tiny_engine):
    """Two prompts of different lengths at once (CPU: one decode_batch step at a time) give each prompt's
    own answer, each cut at its own stop id."""
    a, b = random_ids(7, seed=11)[0].tolist(), random_ids(4, seed=12)[0].tolist()
    gen = GenerationConfig(max_new_tokens=6, temperature=0, stop_ids=())
    want = [list(tiny_engine.generate(p, gen)) for p in (a, b)]
    assert tiny_engine.generate_batch([a, b], gen) == want
    stop = GenerationConfig(max_new_tokens=6, temperature=0, stop_ids=(want[1][2],))
    cut = [w[:w.index(want[1][2])] if want[1][2] in w else w for w in want]
    assert tiny_engine.generate_batch([a, b], stop) == cut
    with pytest.raises(QconvError, match="holds 2"):
        tiny_engine.generate_batch([a, b, a], gen)


def test_session_len_bounds_prompt_and_answer(tiny_engine):
    with pytest.raises(QconvError, match="session_len is 24"):
        tiny_engine.generate(list(range(24)), GREEDY)
    out = list(tiny_engine.generate(list(range(20)), GenerationConfig(max_new_tokens=50, temperature=0, stop_ids=())))
    assert len(out) == 4 and tiny_engine.last_stats.finish == "length"


def test_generation_stops_on_every_stop_id(tiny_engine):
    prompt = random_ids(6, seed=8)[0].tolist()
    first = list(tiny_engine.generate(prompt, GREEDY))
    gen = GenerationConfig(max_new_tokens=8, temperature=0, stop_ids=(first[2], 12345))
    assert list(tiny_engine.generate(prompt, gen)) == first[:2] and tiny_engine.last_stats.finish == "stop"


def test_prefill_time_lasts_until_the_first_token_is_known(tiny_engine, monkeypatch):
    """On a GPU the prefill's launches return before its kernels finish; the first token's sampling waits for
    them. That wait is the prefill's (time to first token), not the decode's."""
    import time
    from qconv.runtime import batch as B
    calls = []

    def slow_first(logits, *a):
        if not calls:
            time.sleep(1.5)  # a device still busy with the prefill (long beside two tiny steps, even on a busy CPU)
        calls.append(1)
        return S.sample(logits, *a)
    monkeypatch.setattr(B, "sample", slow_first)
    gen = GenerationConfig(max_new_tokens=3, temperature=0.7, stop_ids=(), seed=0)
    assert len(list(tiny_engine.generate(random_ids(5, seed=4)[0].tolist(), gen))) == 3
    s = tiny_engine.last_stats
    assert s.prefill_s >= 1.5 > s.decode_s and len(calls) == 3


def test_chat_drops_the_oldest_rounds_first(tiny_engine):
    long = "lorem ipsum " * 4
    msgs = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "first " + long},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "second"}]
    ids, dropped = tiny_engine.chat_prompt(msgs, max_new_tokens=4)
    text = tiny_engine.tokenizer.decode(ids)
    assert "SYS" in text and "second" in text and "first" not in text and dropped == 2


# ----------------------------------------------------------------------------------------------
# Sampling: pure functions by hand
# ----------------------------------------------------------------------------------------------
def test_repetition_penalty_by_hand():
    out = S.apply_repetition_penalty(torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[True, True, False]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]  # seen: l / p if l > 0 else l * p


def test_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert torch.isinf(S.top_k_filter(logits, 2)).tolist() == [[False, False, True]]
    assert torch.isinf(S.top_p_filter(logits, 0.6)).tolist() == [[False, False, True]]  # 0.5 < 0.6: keep 2nd
    assert torch.isinf(S.top_p_filter(logits, 0.5)).tolist() == [[False, True, True]]   # 0.5 reaches 0.5
    assert torch.isinf(S.top_p_filter(logits[:, [2, 0, 1]], 0.6)).tolist() == [[True, False, False]]


def test_sampling_is_greedy_at_zero_temperature_and_seeded_otherwise():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seen = torch.zeros_like(logits, dtype=torch.bool)
    assert torch.equal(S.sample(logits, GenerationConfig(temperature=0), seen), logits.argmax(-1))
    gen = GenerationConfig(temperature=1.0, top_k=5, top_p=1.0)
    draws = [S.sample(logits, gen, seen, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    assert all(d in logits[i].topk(5).indices for i, d in enumerate(draws[0]))
    with pytest.raises(QconvError, match="--top-p"):
        GenerationConfig(top_p=0.0)


def test_w4_workspace_ppl_equals_the_awq_checkpoints_on_smollm2(smollm2_hf, wiki_path, tmp_path, run_cli):
    """Issue 4: `qconv eval` of a W4 workspace equals `qconv eval` of the AWQ checkpoint it came from (0.1%)."""
    code, _, err = run_cli("awq", "--model", smollm2_hf, "--work-dir", tmp_path / "w", "--method", "rtn",
                           "--w-group-size", 64)
    assert code == 0, err
    ckpt = tmp_path / "w" / "awq_checkpoint"
    ws = convert(ckpt, tmp_path / "ws", "--session-len", 512)
    assert WorkspaceConfig.read(ws / "config.ini").weight_type == "int4"
    ppl = []
    for model in (ckpt, ws):
        code, out, err = run_cli("eval", "--model", model, "--dataset", wiki_path, "--windows", 2, "--seqlen", 512,
                                 "--json")
        assert code == 0, err
        ppl.append(json.loads(next(line for line in out.splitlines() if line.startswith("{")))["ppl"])
    assert abs(ppl[1] / ppl[0] - 1) < 1e-3, ppl
    # chat's CPU default for int4 is bf16 through torch's int4 kernel (eval above asked for float32)
    from qconv.runtime.cpu.linear import Int4Linear

    engine = Engine.from_workspace(ws, device="cpu")
    assert engine.ws.dtype == torch.bfloat16 and isinstance(engine.model.layers[0].w13, Int4Linear)


def test_kv_cache_over_its_memory_share_says_what_to_lower(tmp_path, tiny_llama, run_cli):
    """cache_max_entry_count bounds the cache's share of free memory: over it, one line that says how many
    tokens fit and what to lower; exit code 2. Within it (2 rows here) the same workspace loads."""
    from qconv.runtime.engine import _free_memory
    ws = convert(tiny_llama, tmp_path / "ws", "--session-len", 4096, "--max-batch-size", 4)
    cfg = WorkspaceConfig.read(ws / "config.ini")
    per_token = 2 * cfg.num_layer * cfg.kv_head_num * cfg.size_per_head * 4  # float32 K and V on the CPU
    free = _free_memory(torch.device("cpu"))
    share = per_token * 4096 * 2.5 / free  # room for 2.5 sequences of 4096 tokens
    cfg.replace(cache_max_entry_count=share).write(ws / "config.ini")
    with pytest.raises(QconvError) as e:
        Engine.from_workspace(ws, device="cpu", dtype="float32", batch_size=4, verify=False)
    msg = str(e.value)
    fit = int(msg.split("room for ")[1].split(" tokens")[0])
    assert abs(fit - 2.5 * 4096) < 0.05 * 4096 and "--max-batch-size" in msg and "--session-len" in msg
    Engine.from_workspace(ws, device="cpu", dtype="float32", batch_size=2, verify=False).close()
    code, out, err = run_cli("serve", ws, "--device", "cpu", "--dtype", "float32", "--max-batch-size", 4,
                             "--no-verify", "--port", 0)
    assert code == 2 and "room for" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
