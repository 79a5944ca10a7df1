"""Pieces of bench.gpu_runtime (and bench.gpu_graph_sweep): workspaces from a random model, the correctness gate, one row's numbers.

Speed rows follow BENCH_PROTOCOL: greedy, EOS ignored, median of ``runs`` after a warm-up; decode tok/s
counts the whole generate call (the short prompt's prefill included), as for HF's generate.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from bench.common import log, random_model_folder
from qconv.convert.fileio import save_tensors
from qconv.convert.workspace import ConvertRequest, convert_workspace, install_kv_params
from qconv.pipelines.kv_params import compute_kv_params
from qconv.runtime.engine import Engine
from qconv.runtime.generation import GenerationConfig


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, runs: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_kernels(step, steps: int = 3, top: int = 12) -> dict:
    """Device time per kernel of ``step()`` (eager launches, under torch.profiler), over ``steps`` calls: kernels
    per call, their total µs per call, the ``top`` kernel names by time, and one call's kernels in order."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if str(e.device_type).endswith("CUDA")),
                     key=lambda e: e.time_range.start)
    totals: dict[str, float] = {}
    for e in kernels:
        totals[e.name[:60]] = totals.get(e.name[:60], 0.0) + e.time_range.elapsed_us() / steps
    per_step = len(kernels) // steps
    return {"kernels_per_step": per_step, "kernel_us_per_step": sum(totals.values()),
            "top": dict(sorted(totals.items(), key=lambda kv: -kv[1])[:top]),
            "sequence": [(e.name[:40], round(e.time_range.elapsed_us(), 1)) for e in kernels[:per_step]]}


def rand_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(100, vocab - 100, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def model_bytes(model) -> tuple[int, int]:
    """(bytes of every weight, bytes one decode step reads: all but the embedding table unless it is
    also the head)."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or name in ("cos", "sin") or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    emb = model.tok_embeddings
    emb_is_head = model.output is emb and getattr(model, "head", None) is None
    return total, total - (0 if emb_is_head else emb.numel() * emb.element_size())


def kv_bytes(cfg, tokens: int, quantized: bool) -> int:
    """K and V of one sequence of ``tokens`` (+ the int8 params: 4 floats per layer and kv head)."""
    per = 2 * cfg.num_layer * cfg.kv_head_num * tokens * cfg.size_per_head * (1 if quantized else 2)
    return per + (4 * cfg.num_layer * cfg.kv_head_num * 4 if quantized else 0)


# ----------------------------------------------------------------------------------------------
def build_workspaces(config: dict, tokenizer: str, work: Path, session_len: int, batch: int, group: int,
                     device: str) -> dict[str, Path]:
    """Random HF model (transformers' init, std 0.02) -> fp16, int4 (RTN), and both with int8 KV params
    taken from the fp16 workspace's cache after a random prompt. Returns name -> workspace."""
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(config))
    hf = work / "hf"
    if not (hf / "config.json").is_file():
        shutil.rmtree(hf, ignore_errors=True)
        random_model_folder(str(work / "config.json"), tokenizer, hf)
    log(f"  random model {hf}: {time.perf_counter() - t0:.0f}s")
    quiet = dict(log=lambda *_: None)
    fp16 = convert_workspace(ConvertRequest(str(hf), str(work / "fp16"), weight_type="fp16", session_len=session_len,
                                            max_batch_size=batch, force=True), **quiet)
    w4 = convert_workspace(ConvertRequest(str(hf), str(work / "w4"), weight_type="int4", group_size=group,
                                          session_len=session_len, max_batch_size=batch, force=True), **quiet)
    log(f"  workspaces fp16, w4 (RTN g{group}): {time.perf_counter() - t0:.0f}s")
    kv = kv_params_from_run(fp16, device, work / "kv_qparams.safetensors", min(512, session_len - 1))
    out = {"fp16": fp16, "W4A16": w4}
    for name, src in (("fp16 + KV int8", fp16), ("W4A16 + KV int8", w4)):
        out[name] = with_kv_params(src, kv)
    log(f"  workspaces with KV int8: {time.perf_counter() - t0:.0f}s")
    return out


def kv_params_from_run(ws: Path, device: str, out: Path, n: int = 512) -> Path:
    """Asymmetric per-head int8 KV params from the K/V ranges that ``ws`` caches for a random prompt of n
    tokens, saved to ``out``."""
    eng = Engine.from_workspace(ws, device=device, verify=False)
    ids = torch.tensor([rand_ids(n, eng.cfg.vocab_size, 99)], device=eng.device)
    eng.model(ids, torch.arange(n, device=eng.device)[None], eng.cache)
    L = eng.cfg.num_layer  # per (head, dim) ranges [H, D] of the cached K/V -> asymmetric per-head params
    stats = [{f"layers.{i}.{s}": getattr(t[i][0, :, :n].float(), f"a{s}")(dim=1).cpu() for i in range(L)
              for s in ("min", "max")} for t in (eng.cache.k, eng.cache.v)]
    save_tensors(compute_kv_params(*stats, L, False, "head", 1), out)
    eng.close()
    return out


def with_kv_params(ws: Path, kv: Path) -> Path:
    """A copy of ``ws`` (its files hard-linked) with int8 KV params installed: ws.name + "_kv8"."""
    dst = ws.parent / (ws.name + "_kv8")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ws, dst, copy_function=os.link)  # weights shared; every qconv write replaces files
    install_kv_params(dst, kv)
    return dst


# ----------------------------------------------------------------------------------------------
def gate(spaces: dict[str, Path], new_tokens: int = 32, prompt_len: int = 48) -> dict:
    """The GPU path against the CPU runtime (float32) on the same workspace: prefill logits, decode-step
    logits on the CPU's own greedy tokens (teacher forcing), free greedy agreement, and a batch step with
    rows at different positions. The CPU runtime loads the head the GPU engine chose (int8 for int4 workspaces,
    the default; fp otherwise); a name ending in "int4 head" loads the GPU engine with an int4 head, which
    the CPU runtime cannot (its errors then include the head's quantization)."""
    out = {}
    for name, ws in spaces.items():
        gpu = Engine.from_workspace(ws, device="cuda", verify=False, batch_size=3,
                                    head="int4" if name.endswith("int4 head") else "auto")
        same = "int8" if type(gpu.model.head).__name__ == "Int8Head" else "fp"
        cpu = Engine.from_workspace(ws, device="cpu", dtype="float32", verify=False, batch_size=3, head=same)
        V = cpu.cfg.vocab_size
        prompt = rand_ids(prompt_len, V, 7)
        ids = torch.tensor([prompt])
        r = {"prefill_rel_err": _rel(gpu.logits(ids.cuda()).cpu(), cpu.logits(ids))}
        gen = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, stop_ids=())
        want = list(cpu.generate(prompt, gen))
        got = list(gpu.generate(prompt, gen))
        r["greedy_agree"] = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), len(want))
        # teacher forcing through the decode path: the CPU's tokens into both
        cpu.reset()
        gpu.reset()
        cpu.model(ids, torch.arange(prompt_len)[None], cpu.cache)
        gpu.model(ids.cuda(), torch.arange(prompt_len, device="cuda")[None], gpu.cache)
        errs, agree = [], 0
        for i, t in enumerate(want):
            p = prompt_len + i
            a = cpu.model(torch.tensor([[t]]), torch.tensor([[p]]), cpu.cache, last_only=True)[0, -1].float()
            b = gpu.runner.decode([t], [p], [0])[0].float().cpu()
            errs.append(_rel(b, a))
            agree += int(a.argmax() == b.argmax())
        r["decode_max_rel_err"], r["teacher_forced_agree"] = max(errs), f"{agree}/{len(want)}"
        # three rows, then one step with each row at its own position (rows 1, 2 rewind)
        three = torch.tensor([rand_ids(prompt_len, V, 8 + j) for j in range(3)])
        pos3 = torch.arange(prompt_len).expand(3, prompt_len)
        cpu.model(three, pos3, cpu.cache)
        gpu.model(three.cuda(), pos3.cuda(), gpu.cache)
        toks, ps = [5, 6, 7], [prompt_len, prompt_len - 10, 20]
        a = cpu.model(torch.tensor(toks)[:, None], torch.tensor(ps)[:, None], cpu.cache, last_only=True)[:, -1]
        r["batch_rel_err"] = _rel(gpu.decode_batch(toks, ps).cpu(), a.float())
        r["pass"] = (r["prefill_rel_err"] < 2e-2 and r["decode_max_rel_err"] < 2e-2 and r["batch_rel_err"] < 2e-2)
        if name.endswith("int4 head"):
            r["pass"] = "n/a (the head is requantized: these errors measure that)"
        log(f"  gate {name}: {r}")
        out[name] = r
        del cpu, gpu
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ----------------------------------------------------------------------------------------------
def measure_row(ws: Path, plan, device: str, bw: float | None, head: str = "auto", quick: bool = False) -> dict:
    """Memory, decode bs1 / bs-N, prefill and TTFT, decode at a long context, graph step time
    (``quick``: memory and bs1 only). ``head``: runtime/loader.load_workspace's head format."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    eng = Engine.from_workspace(ws, device=device, verify=False, batch_size=plan.batch, head=head)
    cfg, V = eng.cfg, eng.cfg.vocab_size
    q = cfg.quant_policy == 4
    total, per_step = model_bytes(eng.model)
    r = {"weight_bytes": total, "step_weight_bytes": per_step, "kv_bytes_512": kv_bytes(cfg, 512, q),
         "kv_bytes_4096": kv_bytes(cfg, 4096, q), "kv_cache_bytes": eng.cache.nbytes()}
    if device == "cuda":  # after load: weights + KV cache + the runtime's buffers (CUDA graphs' static buffers, ...)
        r["loaded_bytes"] = torch.cuda.memory_allocated()
        r["buffer_bytes"] = r["loaded_bytes"] - total - r["kv_cache_bytes"]
    gen = GenerationConfig(max_new_tokens=plan.new_tokens, temperature=0.0, stop_ids=())
    prompt = rand_ids(plan.prompt_len, V, 1)

    def decode1():
        eng.reset()
        assert sum(1 for _ in eng.generate(prompt, gen)) == plan.new_tokens
    t = median_time(decode1, plan.runs)
    s = eng.last_stats
    r["decode_tok_s"] = plan.new_tokens / t
    r["decode_only_tok_s"] = decode_rate(s)
    if bw:  # roofline: copy bandwidth / bytes per step (weights + the KV at the mean context)
        step_bytes = per_step + kv_bytes(cfg, plan.prompt_len + plan.new_tokens // 2, q)
        r["roofline_tok_s"] = bw / step_bytes
        r["pct_roofline"] = 100 * r["decode_tok_s"] / r["roofline_tok_s"]
        head = getattr(eng.model, "head", None)
        if head is not None:  # also against the bytes of the same model with an fp16 head (the yardstick)
            fp_head = cfg.vocab_size * cfg.hidden_units * 2
            r["roofline_fp16_head_tok_s"] = bw / (step_bytes - head.nbytes() + fp_head)
            r["pct_roofline_fp16_head"] = 100 * r["decode_tok_s"] / r["roofline_fp16_head_tok_s"]
    if getattr(eng.runner, "graphs", None) is not None:
        r["graph_step_us"] = graph_step_us(eng, plan.prompt_len)
    log(f"    bs1 {r['decode_tok_s']:.1f} tok/s (decode only {r['decode_only_tok_s']:.1f}), "
        f"step {r.get('graph_step_us', float('nan')):.1f} µs")
    if quick:
        r["_engine"] = eng
        return r

    for B in plan.batches or (plan.batch,):
        prompts = [rand_ids(plan.prompt_len, V, 10 + j) for j in range(B)]

        def decode_b():  # Engine.generate_batch: greedy, all rows' steps in device-side bursts on the GPU path
            assert [len(a) for a in eng.generate_batch(prompts, gen)] == [plan.new_tokens] * len(prompts)
        r[f"decode_bs{B}_tok_s"] = B * plan.new_tokens / median_time(decode_b, plan.runs)
        log(f"    bs{B} {r[f'decode_bs{B}_tok_s']:.1f} tok/s")

    one = GenerationConfig(max_new_tokens=1, temperature=0.0, stop_ids=())
    long_prompt = rand_ids(plan.prefill_len, V, 2)

    def prefill():
        eng.reset()
        assert len(list(eng.generate(long_prompt, one))) == 1
    r["ttft_ms"] = 1000 * median_time(prefill, plan.runs)
    r["prefill_tok_s"] = plan.prefill_len / (r["ttft_ms"] / 1000)
    log(f"    prefill {plan.prefill_len}: TTFT {r['ttft_ms']:.1f} ms ({r['prefill_tok_s']:.0f} tok/s)")

    ctx_gen = GenerationConfig(max_new_tokens=plan.ctx_new, temperature=0.0, stop_ids=())
    ctx_prompt = rand_ids(plan.ctx_len, V, 3)
    rates = []
    for _ in range(1 + plan.runs):  # warm-up, then the median of the measured runs (the protocol's decode)
        eng.reset()
        list(eng.generate(ctx_prompt, ctx_gen))
        rates.append(decode_rate(eng.last_stats))
    r[f"decode_tok_s_ctx{plan.ctx_len}"] = statistics.median(rates[1:])
    if getattr(eng.runner, "graphs", None) is not None:
        r[f"graph_step_us_ctx{plan.ctx_len}"] = graph_step_us(eng, plan.ctx_len + plan.ctx_new)
    log(f"    ctx {plan.ctx_len}: {r[f'decode_tok_s_ctx{plan.ctx_len}']:.1f} tok/s")
    if device == "cuda":
        r["peak_bytes"] = torch.cuda.max_memory_allocated()
        r["peak_over_loaded"] = r["peak_bytes"] / r["loaded_bytes"]
    r["_engine"] = eng  # the caller measures variants on it, then drops it
    return r


def decode_rate(stats) -> float:
    """Decode steps per second of one answer: its first token comes from the prefill (GenerationStats.prefill_s
    ends when that token is on the host), so new_tokens - 1 steps ran in decode_s."""
    return (stats.new_tokens - 1) / stats.decode_s


def graph_step_us(eng, position: int, reps: int = 50) -> float:
    """Device time of one bucket-1 decode step at ``position`` (graph replays, events)."""
    dec = eng.runner.graphs
    dec.step_host([11], [position])  # sets the static inputs (and captures the bucket if needed)
    graph = dec.graphs[dec.key(1, position + 1)]
    eager = lambda: eng.model.decode_step(dec.bufs, 1, dec.cache, dec.opts)  # noqa: E731
    return replay_us(graph.replay if graph is not None else eager, reps)


def replay_us(replay, reps: int = 50) -> float:
    """Device µs per call of ``replay()`` (a graph replay), one warm-up call then ``reps`` timed by events."""
    replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def measure_hf(folder: Path, plan, device: str) -> dict:
    """transformers' own generate (eager attention) on the same random weights."""
    from transformers import AutoModelForCausalLM

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    dt = torch.float16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, attn_implementation="eager").to(device).eval()
    V, N, P, B = model.config.vocab_size, plan.hf_tokens, plan.prompt_len, plan.batch
    r = {"weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    ids = torch.tensor([rand_ids(P, V, 1)], device=device)
    ids_b = torch.tensor([rand_ids(P, V, 10 + j) for j in range(B)], device=device)

    def gen(x, n):
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == x.shape[1] + n
    r["decode_tok_s"] = N / median_time(lambda: gen(ids, N), plan.runs)
    r[f"decode_bs{B}_tok_s"] = B * N / median_time(lambda: gen(ids_b, N), plan.runs)
    long_ids = torch.tensor([rand_ids(plan.prefill_len, V, 2)], device=device)
    r["ttft_ms"] = 1000 * median_time(lambda: gen(long_ids, 1), plan.runs)
    r["prefill_tok_s"] = plan.prefill_len / (r["ttft_ms"] / 1000)
    if device == "cuda":
        r["peak_bytes"] = torch.cuda.max_memory_allocated()
        r["peak_over_loaded"] = r["peak_bytes"] / r["loaded_bytes"]
    log(f"    HF: bs1 {r['decode_tok_s']:.1f} tok/s, bs{B} {r[f'decode_bs{B}_tok_s']:.1f}, TTFT {r['ttft_ms']:.0f} ms")
    del model
    return r
