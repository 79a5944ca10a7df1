"""The bundled runtime's GPU decode path (issue 5): kernels, correctness gate, speed and memory, one run.

    python3 -m bench.gpu_runtime                   # everything (~6-8 min on an H100), table printed last
    python3 -m bench.gpu_runtime --kernels-only    # GEMV / attention microbenchmarks only (~1-2 min)
    python3 -m bench.gpu_runtime --smoke           # tiny shapes in seconds; without CUDA the reference path only

Steps, each on its own (a failure is printed and the rest goes on), results saved after each:
  [1] device copy bandwidth (read + write bytes of a 1 GiB device-to-device copy)
  [2] kernels: int4 GEMV candidates per decode role at M=1 and 8 (Triton fused, tinygemm, dequant + cuBLAS,
      cuBLAS fp16), each alone; reported, not applied (the kernel config tables come from
      bench.gpu_graph_sweep, which times whole decode steps); attention
  [3] gate: SmolLM2-shaped random model, GPU path vs the CPU runtime (fp16, and W4 g64 + KV int8)
  [4] qwen2.5-1.5b-shaped random model: fp16, W4A16 (RTN g128), + KV int8 each; HF transformers fp16 eager
Writes bench/results/gpu_runtime.json (gpu_runtime_smoke.json with --smoke, gpu_kernels.json with --kernels-only),
copied to $OUT when set.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.common import log, provenance, write_result
from bench.gpu_micro import bench_attention, bench_linears, print_tuned, tuned_json
from bench.gpu_rows import build_workspaces, gate, graph_step_us, measure_hf, measure_row, profile_kernels

ROOT = Path(__file__).resolve().parent.parent
SMOL = dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5,
            rope_theta=100000.0, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
TINY = dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=False, rms_norm_eps=1e-6,
            max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)


@dataclass
class Plan:
    prompt_len: int = 32
    new_tokens: int = 256
    batch: int = 8                 # cache rows
    batches: tuple = ()            # batched decode at these batch sizes (() : at ``batch``)
    prefill_len: int = 2048
    ctx_len: int = 4096
    ctx_new: int = 128
    hf_tokens: int = 64
    runs: int = 3
    session_len: int = 4608
    group: int = 128


SMOKE = Plan(prompt_len=8, new_tokens=12, batch=4, prefill_len=64, ctx_len=128, ctx_new=8, hf_tokens=6, runs=1,
             session_len=256, group=32)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    a = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    return 2 * nbytes * 10 / (start.elapsed_time(end) / 1000)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=".carry/configs/qwen2.5-1.5b.json", help="HF config of the speed model")
    ap.add_argument("--tokenizer", default=".carry/qwen-tokenizer")
    ap.add_argument("--smol-tokenizer", default=".carry/smol-tokenizer")
    ap.add_argument("--work", default="/tmp/qconv-gpu-bench")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; without CUDA only the reference path")
    ap.add_argument("--kernels-only", action="store_true")
    ap.add_argument("--full-sweep", action="store_true", help="more GEMV configs (default with --kernels-only)")
    ap.add_argument("--skip", default="", help="comma list of steps to skip: kernels,gate,rows,hf")
    ap.add_argument("--budget-s", type=float, default=500, help="start no step or row after this many seconds")
    args = ap.parse_args()
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    skip = set(filter(None, args.skip.split(",")))
    plan = SMOKE if args.smoke else Plan()
    path = lambda p: Path(p) if Path(p).is_absolute() else ROOT / p  # noqa: E731
    model_cfg = TINY if args.smoke else json.loads(path(args.config).read_text())
    gate_cfg = TINY if args.smoke else SMOL
    name = "gpu_kernels" if args.kernels_only else ("gpu_runtime_smoke" if args.smoke else "gpu_runtime")
    res = {**provenance(), "plan": asdict(plan), "config": args.config, "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if cuda else "cpu", "errors": {}}
    work = Path(args.work) / ("smoke" if args.smoke else "full")

    def step(key, fn):
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            log(f"[{elapsed:6.0f}s] {key}: skipped, past --budget-s {args.budget_s:.0f}")
            res["errors"][key] = "skipped: time budget"
            return
        log(f"[{elapsed:6.0f}s] {key}")
        try:
            res[key] = fn()
        except Exception as e:  # noqa: BLE001  (report, keep going)
            traceback.print_exc()
            res["errors"][key] = f"{type(e).__name__}: {e}"
        save(res, name)

    # [1] device
    if cuda:
        step("copy_bandwidth", copy_bandwidth)
        log(f"  D2D copy bandwidth {res.get('copy_bandwidth', 0) / 1e12:.2f} TB/s")
    bw = res.get("copy_bandwidth")

    # [2] kernels
    if cuda and "kernels" not in skip:
        full = args.full_sweep or args.kernels_only

        def kernels():  # reported only: the engines keep their GPU's kernel config table, chosen in the decode graph
            lin, tuned = bench_linears(model_cfg, group=plan.group, full=full)  # (bench.gpu_graph_sweep)
            print_tuned(tuned)
            return {"linears": lin, "tuned": tuned_json(tuned),
                    "attention": bench_attention(model_cfg, contexts=(512, 4096) if not args.smoke else (64,),
                                                 full=full)}
        step("kernels", kernels)
    if args.kernels_only:
        return finish(res, name, t_start)

    # [3] gate
    if cuda and "gate" not in skip:
        def run_gate():
            spaces = build_workspaces(gate_cfg, str(path(args.smol_tokenizer)), work / "gate", 512, 3, 64, device)
            return gate({"fp16": spaces["fp16"], "W4A16 + KV int8": spaces["W4A16 + KV int8"],
                         "W4A16 + KV int8, int4 head": spaces["W4A16 + KV int8"]})
        step("gate", run_gate)

    # [4] rows
    rows = res.setdefault("rows", {})
    if "rows" not in skip:
        step("_spaces", lambda: build_workspaces(model_cfg, str(path(args.tokenizer)), work / "model", plan.session_len,
                                                 plan.batch, plan.group, device))
        for row, ws in (res.get("_spaces") or {}).items():
            def one(ws=ws, row=row):
                log(f"  row {row}")
                r = measure_row(ws, plan, device, bw)
                eng = r.pop("_engine")
                if row == "W4A16 + KV int8" and cuda:
                    r["variants"] = variants(eng, plan)
                del eng
                return r
            step(f"row {row}", one)
            if f"row {row}" in res:
                rows[row] = res.pop(f"row {row}")
        if cuda and "W4A16 + KV int8" in (res.get("_spaces") or {}):
            for head, label in (("fp", "fp16 head"), ("int4", "int4 head (opt-in, RTN g128 at load)")):
                def other_head(ws=res["_spaces"]["W4A16 + KV int8"], head=head, label=label):
                    log(f"  row W4A16 + KV int8, {label}")
                    r = measure_row(ws, plan, device, bw, head=head, quick=True)
                    r.pop("_engine")
                    return r
                step(f"row {head} head", other_head)
                if f"row {head} head" in res:
                    rows[f"W4A16 + KV int8, {head} head"] = res.pop(f"row {head} head")
    if "hf" not in skip:
        step("_hf", lambda: measure_hf(work / "model" / "hf", plan, device))
        if "_hf" in res:
            rows["HF transformers fp16 eager"] = res.pop("_hf")
    finish(res, name, t_start)


def variants(eng, plan) -> dict:
    """The same W4 + KV int8 engine with other decode settings (RuntimeOptions, a new runner each): graph step µs
    and bs1 tok/s."""
    from qconv.runtime.cuda.linear import fits_tinygemm
    from qconv.runtime.generation import GenerationConfig

    out = {}
    gen = GenerationConfig(max_new_tokens=plan.new_tokens, temperature=0.0, stop_ids=())
    prompt = list(range(1000, 1000 + plan.prompt_len))
    lins = [m for blk in eng.model.layers for m in (blk.wqkv, blk.wo, blk.w13, blk.w2)]
    configured = eng.opts

    def measure(label, **changes):
        try:
            eng.reconfigure(configured.replace(**changes))
            list(eng.generate(prompt, gen))  # warm-up (compile, capture)
            eng.reset()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            list(eng.generate(prompt, gen))
            s = eng.last_stats
            out[label] = {"graph_step_us": graph_step_us(eng, plan.prompt_len),
                          "decode_tok_s": plan.new_tokens / (time.perf_counter() - t0),
                          "decode_only_tok_s": s.new_tokens / s.decode_s}
            log(f"    variant {label}: {out[label]}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            out[label] = f"{type(e).__name__}: {e}"

    def at_4096(label):  # the step at a long context (the cache's contents do not matter to the time)
        if isinstance(out.get(label), dict):
            out[label]["graph_step_us_ctx4096"] = graph_step_us(eng, plan.ctx_len + plan.ctx_new)
            log(f"      at {plan.ctx_len + plan.ctx_new}: {out[label]['graph_step_us_ctx4096']:.1f} µs")
    measure("as configured")
    at_4096("as configured")
    for mode, label in (("one", "rope + attention + merge in one kernel"), ("three", "rope, attention, merge: three kernels")):
        measure(label, attention=mode)
        at_4096(label)
    for bn, warps in ((64, 4), (128, 8)):
        measure(f"fused attention block_n {bn}, {warps} warps", attention_block_n=bn, attention_warps=warps)
        at_4096(f"fused attention block_n {bn}, {warps} warps")
    for n in (4, 16):  # greedy steps per graph launch
        measure(f"greedy bursts of {n} steps", burst=n)
    measure("greedy bursts of 8 steps (again)", burst=8)
    dec = eng.runner.graphs  # host time of one launch of the burst graph (1000+ kernel nodes), and its device time
    g = dec.burst_graphs.get((1, True)) or dec.burst_graphs.get((1, False))
    if g is not None:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        g.replay()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        out["burst graph launch"] = {"host_us": 1e6 * (t1 - t0), "launch_and_run_us": 1e6 * (time.perf_counter() - t0)}
        log(f"    burst graph: host {out['burst graph launch']['host_us']:.0f} µs to launch, "
            f"{out['burst graph launch']['launch_and_run_us']:.0f} µs to finish")
    measure("attention splits capped at 16", attention_split_cap=16)
    at_4096("attention splits capped at 16")
    measure("graphs without PDL (programmatic dependent launch off)", pdl=False)
    measure("no CUDA graphs (eager kernels)", cuda_graphs=False)
    eng.reconfigure(configured)
    out["kernel profile"] = profile_step(eng, plan.prompt_len)
    head = eng.model.head
    if type(head).__name__ == "Int8Head":  # the int8 head's configs, in the graph
        from qconv.runtime.cuda.kernels.gemm_int8 import SWEEP_INT8
        sweep = {}
        for c in SWEEP_INT8:
            head.config = c
            eng.reconfigure(configured)  # fresh graphs with this head config
            try:
                sweep[str(c)] = graph_step_us(eng, plan.prompt_len)
            except Exception as e:  # noqa: BLE001
                sweep[str(c)] = f"{type(e).__name__}: {str(e)[:100]}"
            log(f"    int8 head {c}: {sweep[str(c)]}")
        head.config = None
        out["int8 head configs (graph step µs)"] = sweep
    if all(fits_tinygemm(m) for m in lins if m.int4):
        for m in lins:
            m.backend = "tinygemm"
        measure("int4 via torch tinygemm (+ separate norm/add kernels)")
        for m in lins:
            m.backend = "triton"
    return out


def profile_step(eng, position: int) -> dict:
    """Device time per kernel of one bucket-1 decode step (eager, under torch.profiler): totals by kernel
    name and the first layer's sequence (its kernels in order, so the GEMV roles can be told apart)."""
    try:
        dec = eng.runner.graphs
        dec.step_host([11], [position])
        short = dec.key(1, position + 1)[1]  # the kernels the step's graph runs
        p = profile_kernels(lambda: eng.model.decode_step(dec.bufs, 1, dec.cache, dec.opts, short=short))
        first = p.pop("sequence")[:12]
        log(f"    profile: {p['kernels_per_step']} kernels per step, {p['kernel_us_per_step']:.0f} µs of kernel time "
            f"per step")
        for name, us in p["top"].items():
            log(f"      {us:8.1f} µs/step  {name}")
        log("    first kernels of a step: " + ", ".join(f"{n} {t}" for n, t in first))
        return {**p, "first_kernels": first}
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}


# ----------------------------------------------------------------------------------------------
def save(res: dict, name: str) -> Path:
    """Everything but the private keys (engines, paths), anything JSON cannot hold as its str; also into
    $OUT when set (what a lent device machine sends back)."""
    out = write_result(name, json.loads(json.dumps({k: v for k, v in res.items() if not k.startswith("_")},
                                                   default=str)))
    if os.environ.get("OUT"):
        shutil.copyfile(out, Path(os.environ["OUT"]) / out.name)
    return out


def finish(res: dict, name: str, t_start: float) -> None:
    res["wall_s"] = time.perf_counter() - t_start
    out = save(res, name)
    log(f"\n{out}  ({res['wall_s']:.0f}s)  {res['device']}, torch {res['torch']}, commit {res['commit']}")
    if res["errors"]:
        log("ERRORS: " + "; ".join(f"{k}: {v[:200]}" for k, v in res["errors"].items()))
    bw = res.get("copy_bandwidth")
    if bw:
        log(f"D2D copy bandwidth {bw / 1e12:.2f} TB/s")
    k = res.get("kernels")
    if k:
        log("\n| role | N x K | M | triton fused µs (TB/s) | tinygemm µs | dequant+cuBLAS µs | cuBLAS fp16 µs (TB/s) | "
            "triton config |")
        log("|---|---|---|---|---|---|---|---|")
        for r in k["linears"]:
            def f(key, nbytes=None):
                v = r.get(key)
                if not isinstance(v, float):
                    return str(v if v is not None else (r.get("tinygemm", "-") if key == "tinygemm_us" else "-"))[:40]
                return f"{v:.1f}" + (f" ({nbytes / v / 1e6:.2f})" if nbytes else "")
            log(f"| {r['role']} | {r['N']}x{r['K']} | {r['M']} | {f('triton_us', r['int4_bytes'])}"
                f"{'' if r.get('triton_ok', True) else ' WRONG'} | {f('tinygemm_us')} | {f('dequant_cublas_us')} | "
                f"{f('cublas_fp16_us', r['fp16_bytes'])} | {r.get('triton_cfg', '-').replace('GemvConfig', '')} |")
    g = res.get("gate")
    if g:
        log("\n| gate (GPU vs CPU runtime) | prefill rel err | decode max rel err | teacher-forced argmax | "
            "free greedy agree | batch rel err | pass |\n|---|---|---|---|---|---|---|")
        for n, r in g.items():
            if "prefill_rel_err" not in r:
                continue
            log(f"| {n} | {r['prefill_rel_err']:.2e} | {r['decode_max_rel_err']:.2e} | {r['teacher_forced_agree']} | "
                f"{r['greedy_agree']}/32 | {r['batch_rel_err']:.2e} | {r['pass']} |")
    rows = res.get("rows") or {}
    if not rows:
        return
    plan = res["plan"]
    B, C = plan["batch"], plan["ctx_len"]
    mib = lambda v: f"{v / 2**20:.0f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    num = lambda v, p=1: f"{v:.{p}f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    log(f"\n| configuration | weights MiB | KV@512 MiB | KV@4096 MiB | peak MiB | decode tok/s bs1 | bs{B} | "
        f"prefill {plan['prefill_len']} tok/s | TTFT ms | % roofline bs1 | % fp16-head roofline | tok/s @{C} ctx | "
        f"graph step µs |")
    log("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        log(f"| {n} | {mib(r.get('weight_bytes'))} | {mib(r.get('kv_bytes_512'))} | {mib(r.get('kv_bytes_4096'))} | "
            f"{mib(r.get('peak_bytes'))} | {num(r.get('decode_tok_s'))} | {num(r.get(f'decode_bs{B}_tok_s'))} | "
            f"{num(r.get('prefill_tok_s'), 0)} | {num(r.get('ttft_ms'))} | {num(r.get('pct_roofline'))} | "
            f"{num(r.get('pct_roofline_fp16_head', r.get('pct_roofline')))} | "
            f"{num(r.get(f'decode_tok_s_ctx{C}'))} | {num(r.get('graph_step_us'))} |")
    targets(rows, B, C)


def targets(rows: dict, B: int, C: int) -> None:
    g = lambda row, key: (rows.get(row) or {}).get(key)  # noqa: E731
    hf = g("HF transformers fp16 eager", "decode_tok_s")
    w4kv, w4, fp = g("W4A16 + KV int8", "decode_tok_s"), g("W4A16", "decode_tok_s"), g("fp16", "decode_tok_s")
    checks = [
        ("1 W4A16+KV8 bs1 >= 1000 tok/s", w4kv, lambda v: v >= 1000),
        ("1 W4A16+KV8 >= 40% of roofline (bytes it reads)", g("W4A16 + KV int8", "pct_roofline"), lambda v: v >= 40),
        ("1 W4A16+KV8 >= 40% of the fp16-head roofline", g("W4A16 + KV int8", "pct_roofline_fp16_head"),
         lambda v: v >= 40),
        ("1 W4A16+KV8 >= 60x HF fp16 eager", w4kv / hf if w4kv and hf else None, lambda v: v >= 60),
        ("2 W4A16 >= 2x our fp16 (bs1)", w4 / fp if w4 and fp else None, lambda v: v >= 2),
        ("2' (opt-in int4 head) W4A16+KV8+int4 head / fp16", g("W4A16 + KV int8, int4 head", "decode_tok_s") / fp
         if fp and g("W4A16 + KV int8, int4 head", "decode_tok_s") else None, lambda v: v >= 2),
        ("3 KV int8 bytes @4096 <= half fp16 + params", g("fp16 + KV int8", "kv_bytes_4096"),
         lambda v: v <= g("fp16", "kv_bytes_4096") / 2 + 4096),
        (f"3 KV int8 decode @{C} >= fp16 KV (W4)", g("W4A16 + KV int8", f"decode_tok_s_ctx{C}"),
         lambda v: v >= (g("W4A16", f"decode_tok_s_ctx{C}") or float("inf"))),
        (f"3 KV int8 decode @{C} >= fp16 KV (fp16 weights)", g("fp16 + KV int8", f"decode_tok_s_ctx{C}"),
         lambda v: v >= (g("fp16", f"decode_tok_s_ctx{C}") or float("inf"))),
        (f"4 W4A16 bs{B} >= 5x bs1", (g("W4A16", f"decode_bs{B}_tok_s") or 0) / w4 if w4 else None, lambda v: v >= 5),
        ("5 TTFT (prefill_len prompt) <= 50 ms (W4A16+KV8)", g("W4A16 + KV int8", "ttft_ms"), lambda v: v <= 50),
    ]
    log("\n| target | value | met |\n|---|---|---|")
    for label, v, ok in checks:
        try:
            met = "-" if v is None else ("yes" if ok(v) else "NO")
        except TypeError:  # a peer row is missing
            met = "-"
        log(f"| {label} | {v if v is None else round(v, 2)} | {met} |")


if __name__ == "__main__":
    main()
