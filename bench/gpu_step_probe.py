"""Decode step time by attention merge mode, rows and context; the kernels of one step (issue 5).

    python bench/gpu_step_probe.py                       # qwen2.5-1.5b config, W4A16 (RTN g128) + KV int8
    python bench/gpu_step_probe.py --modes two,one --positions 32,160,288,4160
    python bench/gpu_step_probe.py --modes two --workspaces "fp16,fp16 + KV int8" --positions 160,4160 --no-decode

For each gpu_model.FUSED_ATTENTION mode: the graph step (µs) of one row and of ``--rows`` distinct rows (the
greedy graph generate_batch replays) at each position, then the protocol's decode (32-token prompt, 256 new
tokens, median of 3) at batch 1 and batch ``--rows``, and their ratio; the logits of one step from a fixed
state are compared with the first mode's. Last, a profile of one eager step of one row and of ``--rows`` rows
(the last mode's): device time per kernel, summed by name, and the first layer's kernels in order. Writes
bench/results/gpu_step_probe.json and prints the table last.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_device_result  # noqa: E402
from gpu_graph_sweep import greedy_logits, rows_step_us  # noqa: E402
from gpu_micro import log  # noqa: E402
from gpu_rows import WORKSPACES, build_workspaces, graph_step_us, median_time, profile_kernels, rand_ids  # noqa: E402

from qconv.runtime import gpu_model  # noqa: E402
from qconv.runtime.cuda_graph import DecodeGraphs  # noqa: E402
from qconv.runtime.engine import Engine  # noqa: E402
from qconv.runtime.generation import GenerationConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def modes(text: str) -> list[str]:
    """--modes: a comma list of gpu_model.FUSED_ATTENTION modes."""
    out = [m for m in text.split(",") if m]
    bad = [m for m in out if m not in ("one", "two", "three")]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: give modes from one, two, three, e.g. two,one")
    return out


SESSION = 4608  # the workspaces' session length
REPS = 100  # timed replays per step time (each moves the rows one position on)


def positions(text: str) -> list[int]:
    """--positions: a comma list of positions from which REPS + 1 steps still fit in the session."""
    try:
        out = [int(p) for p in text.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 0 or max(out) + REPS + 1 > SESSION:
        raise argparse.ArgumentTypeError(f"{text!r}: give positions 0..{SESSION - REPS - 1}, e.g. 32,160")
    return out


def rows_count(text: str) -> int:
    """--rows: 2..16 (the several-row bucket)."""
    if not text.isdigit() or not 2 <= int(text) <= 16:
        raise argparse.ArgumentTypeError(f"{text!r}: give 2 to 16 rows")
    return int(text)


def fixed_logits(eng, rows: int, position: int) -> torch.Tensor:
    """The logits of one greedy step of ``rows`` rows from a fixed state (zeroed caches, token 11)."""
    for t in (*eng.cache.k, *eng.cache.v):
        t.zero_()
    return greedy_logits(eng, rows, position)


def decode_rates(eng, rows: int, runs: int = 3) -> tuple[float, float]:
    """The protocol's decode: tok/s at batch 1 and at batch ``rows`` (32-token prompts, 256 new tokens)."""
    gen = GenerationConfig(max_new_tokens=256, temperature=0.0, stop_ids=())
    V = eng.cfg.vocab_size
    prompt = rand_ids(32, V, 1)
    prompts = [rand_ids(32, V, 10 + j) for j in range(rows)]

    def one():
        eng.reset()
        assert sum(1 for _ in eng.generate(prompt, gen)) == 256

    def batch():
        assert [len(a) for a in eng.generate_batch(prompts, gen)] == [256] * rows
    one()
    batch()  # warm-up: captures
    return 256 / median_time(one, runs), rows * 256 / median_time(batch, runs)


def profile_rows(eng, rows: int, position: int) -> dict:
    """Device time per kernel of one eager greedy step of ``rows`` distinct rows."""
    dec = eng.decoder
    dec._upload([11] * rows, [position] * rows, list(range(rows)))
    b = dec.bucket(rows)
    p = profile_kernels(lambda: eng.model.decode_step(dec.bufs, b, dec.cache, distinct=True), top=10)
    first_layer = p.pop("sequence")[2:9]
    return {"rows": rows, "bucket": b, **p, "first_layer": first_layer}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=".carry/configs/qwen2.5-1.5b.json")
    ap.add_argument("--tokenizer", default=".carry/qwen-tokenizer")
    ap.add_argument("--work", default="/tmp/qconv-gpu-bench")
    ap.add_argument("--modes", default=["two", "one"], type=modes, help="gpu_model.FUSED_ATTENTION modes, in turn")
    ap.add_argument("--rows", default=8, type=rows_count, help="the several-row step's rows (the batch of the ratio)")
    ap.add_argument("--positions", default=[32, 160, 288, 1024, 4160], type=positions,
                    help="the steps' positions, a comma list")
    ap.add_argument("--no-decode", action="store_true", help="only the graph steps (no protocol decode runs)")
    ap.add_argument("--workspaces", default=["W4A16 + KV int8"], type=lambda t: [w for w in t.split(",") if w],
                    help="comma list of: " + ", ".join(WORKSPACES))
    ap.add_argument("--profile-last", action="store_true", help="profile at the last position (else at 160)")
    args = ap.parse_args()
    if not args.workspaces or any(w not in WORKSPACES for w in args.workspaces):
        ap.error(f"--workspaces: a comma list of {', '.join(WORKSPACES)}")
    t0 = time.perf_counter()
    path = (lambda p: Path(p) if Path(p).is_absolute() else ROOT / p)
    cfg = json.loads(path(args.config).read_text())
    spaces = build_workspaces(cfg, str(path(args.tokenizer)), Path(args.work) / "model", SESSION, max(8, args.rows),
                              128, "cuda")
    res = {"rows": args.rows, "workspaces": {}}
    for ws in args.workspaces:
        res["workspaces"][ws] = probe(spaces[ws], args)
    res["wall_s"] = time.perf_counter() - t0
    save_device_result("gpu_step_probe", res)
    for ws, w in res["workspaces"].items():
        for key in ("profile_1", "profile"):
            pr = w[key]
            print(f"\n{ws}, {pr['rows']} rows (bucket {pr['bucket']}): {pr['kernels_per_step']} kernels, "
                  f"{pr['kernel_us_per_step']:.0f} µs of kernel time per step (eager)")
            for name, us in pr["top"].items():
                print(f"  {us:8.1f}  {name}")
            print("  first layer: " + ", ".join(f"{n} {t}" for n, t in pr["first_layer"]))
    print("\n| workspace | mode | rows | " + " | ".join(f"@{p}" for p in args.positions)
          + " | bs1 tok/s | bsN tok/s | ratio | rel err |")
    print("|---" * (len(args.positions) + 7) + "|")
    for ws, w in res["workspaces"].items():
        for mode, r in w["modes"].items():
            for n in (1, args.rows):
                print(f"| {ws} | {mode} | {n} | " + " | ".join(f"{r[f'step_us_{n}'][p]:.1f}" for p in args.positions)
                      + f" | {r.get('bs1_tok_s', float('nan')):.1f} | {r.get('bsN_tok_s', float('nan')):.1f} | "
                      f"{r.get('ratio', float('nan')):.3f} | {r['rel_err_vs_first']:.1e} |")


def probe(space: Path, args) -> dict:
    """One workspace: each mode's graph steps (and protocol decodes), then the profiles (the last mode's)."""
    eng = Engine.from_workspace(space, device="cuda", verify=False, batch_size=args.rows)
    res = {"modes": {}}
    ref, shipped = None, gpu_model.FUSED_ATTENTION
    for mode in args.modes:
        gpu_model.FUSED_ATTENTION = mode
        eng.decoder = eng.model.decoder = DecodeGraphs(eng.model, eng.cache)
        r = {"step_us_1": {}, f"step_us_{args.rows}": {}}
        for p in args.positions:
            r["step_us_1"][p] = graph_step_us(eng, p, reps=REPS)
            r[f"step_us_{args.rows}"][p] = rows_step_us(eng, args.rows, p, reps=REPS)
            log(f"  {space.name} {mode} @ {p}: 1 row {r['step_us_1'][p]:.1f} µs, {args.rows} rows "
                f"{r[f'step_us_{args.rows}'][p]:.1f} µs")
        logits = fixed_logits(eng, args.rows, 160)
        ref = logits if ref is None else ref
        r["rel_err_vs_first"] = float((logits - ref).norm() / ref.norm())
        if not args.no_decode:
            r["bs1_tok_s"], r["bsN_tok_s"] = decode_rates(eng, args.rows)
            r["ratio"] = r["bsN_tok_s"] / r["bs1_tok_s"]
            log(f"  {mode}: bs1 {r['bs1_tok_s']:.1f}, bs{args.rows} {r['bsN_tok_s']:.1f} tok/s ({r['ratio']:.2f}x)")
        res["modes"][mode] = r
    at = args.positions[-1] if args.profile_last else 160
    res["profile"] = profile_rows(eng, args.rows, at)
    res["profile_1"] = profile_rows(eng, 1, at)
    gpu_model.FUSED_ATTENTION = shipped
    del eng
    torch.cuda.empty_cache()
    return res


if __name__ == "__main__":
    main()
