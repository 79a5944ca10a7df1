"""int4 matmul configs chosen inside the decode graph (issue 5): the whole step's time is what counts.

    python3 -m bench.gpu_graph_sweep                # qwen2.5-1.5b config, W4A16 (RTN g128) + KV int8, ~4 min
    python3 -m bench.gpu_graph_sweep --roles w13,w2
    python3 -m bench.gpu_graph_sweep --mma --quick --pf 1,3 --rows 1,8 --write-table   # the mma.sync kernel's tiles

bench.gpu_micro times each GEMV alone, in a graph of independent calls; in a decode step each kernel
waits for the one before it (PDL overlaps only its first weight tile), so a config's latency to its last
output matters as much as its bandwidth. Here every candidate config of a role is set on that role's
linears in all layers, the bucket-1 graph is captured again and the step is timed (median of three runs of
100 replays) at a mid-run position; roles go one after the other, each keeping the best found (coordinate
descent), then a second pass over the roles. A config whose logits differ from the baseline's (> 1e-2
relative) is refused. Writes bench/results/gpu_graph_sweep_rows<N>.json (copied to $OUT when set) and, with
--write-table, the winners into this GPU's kernel config table (runtime/cuda/kernels/configs/<GPU>.json, read by
kernels/tuning.py; copied to $OUT too): each role whose best config beat the one it started from gets the entry of
its shape, and the table's other entries stay.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench.common import log, provenance, write_result
from bench.gpu_rows import build_workspaces, graph_step_us, replay_us
from qconv.runtime.cuda.graphs import DecodeGraphs
from qconv.runtime.engine import Engine
from qconv.runtime.cuda.kernels import tuning
from qconv.runtime.cuda.kernels.tuning import GemvConfig, lookup

ROOT = Path(__file__).resolve().parent.parent
ROLES = {"qkv": "wqkv", "o": "wo", "w13": "w13", "w2": "w2"}
RESIDUAL = {"o", "w2"}  # += residual epilogue: split-K allowed (atomic adds)
# split-K counts tried around the current config; the odd ones let a slice fill whole steps of the one-row
# GEMV (w2: 70 groups in 9 slices of <= 8, one step of 8 groups at 4 words per thread; o: 12 groups in 3 of 4)
SPLITS = (1, 2, 3, 4, 5, 6, 8, 9, 12, 16, 18, 24, 32, 35)
# one row on the mma kernel: the K-slices tried with every tile (an mma program's groups run as a serial chain,
# so one row wants short slices: one or two groups each)
MMA_SPLITS_ONE_ROW = {"qkv": (1, 3), "o": (6, 12), "w13": (4, 6, 12), "w2": (18, 35)}


MMA_TILES = ((32, 2), (64, 2), (64, 4), (128, 4), (128, 8), (256, 8), (64, 1), (128, 2))  # (outputs, warps)


def candidates(role: str, group: int, split: int, rows: int, mma: bool = False, pfs: tuple[int, ...] = (1,),
               quick: bool = False) -> list[GemvConfig]:
    """One row: _gemv shapes (rows per program x words per thread x warps) at the given split-K. Several rows:
    _gemm (tl.dot) tiles x warps x pipeline stages, and the GEMV with a program per row. ``mma``:
    kernels/mma_int4.py's tiles (outputs per program x warps; ``quick``: the first four) x how far ahead the
    weights load (``pfs``), for any number of rows (one row: x MMA_SPLITS_ONE_ROW); qkv's and w13's RMSNorm a
    kernel before it."""
    if mma:
        splits = MMA_SPLITS_ONE_ROW[role] if rows == 1 else (split,)
        return [GemvConfig(bn, sp, w, dot=True, mma=True, pf=pf)
                for bn, w in (MMA_TILES[:4] if quick else MMA_TILES) for pf in pfs for sp in splits]
    if rows > 1:  # also the GEMV with a program per row (its RMSNorm fused; split-K only with += residual)
        gemv = [GemvConfig(bn, split if role in RESIDUAL else 1, w, 1, False, v) for bn in (4, 8) for v in (2, 4)
                for w in (1, 2)]
        return gemv + [GemvConfig(bn, split, w, st, True) for bn in (16, 32, 64, 128) for w in (4, 8) for st in (3, 4)]
    wg = group // 8
    return [GemvConfig(bn, split, w, 1, False, v) for bn in (1, 2, 4, 8) for v in (1, 2, 4) for w in (1, 2)
            if wg % v == 0 and (32 * w) % (wg // v) == 0 and (bn >= 2 or role != "w13")]  # SiLU: row pairs


def greedy_graph(eng, rows: int, position: int):
    """The greedy step graph of ``rows`` distinct sequences (captured if need be), its inputs set to cache rows
    0.. at ``position`` with token 11."""
    dec = eng.decoder
    key = dec.key(rows, position + 1, distinct=True)
    if key not in dec.greedy_graphs:
        dec._capture_greedy(*key)
    dec._upload([11] * rows, [position] * rows, list(range(rows)))
    return dec.greedy_graphs[key]


def rows_step_us(eng, rows: int, position: int, reps: int = 50) -> float:
    """Device time of one greedy step of ``rows`` distinct sequences (cache rows 0.., from ``position``; each
    replay moves them on), as generate_batch's bursts run it: the greedy step graph's replays."""
    return replay_us(greedy_graph(eng, rows, position).replay, reps)


def greedy_logits(eng, rows: int, position: int) -> torch.Tensor:
    """The logits of one greedy step of ``rows`` rows from cache rows 0.. at ``position``, token 11."""
    greedy_graph(eng, rows, position).replay()
    torch.cuda.synchronize()
    return eng.decoder.bufs.logits[:rows].float().clone()


def row_counts(text: str) -> list[int]:
    """--rows: one count or a comma list of counts >= 1."""
    try:
        counts = [int(r) for r in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give row counts >= 1, e.g. 1 or 1,8")
    return counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=".carry/configs/qwen2.5-1.5b.json")
    ap.add_argument("--tokenizer", default=".carry/qwen-tokenizer")
    ap.add_argument("--work", default="/tmp/qconv-gpu-bench")
    ap.add_argument("--roles", default="w13,w2,qkv,o")
    ap.add_argument("--position", type=int, default=160, help="the step's position (the protocol run's mean)")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--rows", default=[1], type=row_counts,
                    help="the step's rows (1, or several: tl.dot configs, rows bucket 8 or 16); a comma list sweeps "
                         "each in turn")
    ap.add_argument("--mma", action="store_true", help="sweep the mma.sync kernel's configs (kernels/mma_int4.py)")
    ap.add_argument("--pf", default="1", help="--mma: prefetch depths to try (groups ahead, 1-3; comma list)")
    ap.add_argument("--quick", action="store_true", help="--mma: the first four tiles only")
    ap.add_argument("--splits-only", action="store_true",
                    help="only other split-K counts of each role's current config")
    ap.add_argument("--budget-s", type=float, default=420, help="stop sweeping a row count after this many seconds")
    ap.add_argument("--write-table", nargs="?", const="", default=None, metavar="JSON",
                    help="merge the winning configs into this GPU's kernel config table (default: the package's "
                         "runtime/cuda/kernels/configs/<GPU>.json)")
    args = ap.parse_args()
    try:
        pfs = tuple(int(v) for v in args.pf.split(","))
        assert pfs and all(1 <= v <= 3 for v in pfs)
    except (ValueError, AssertionError):
        ap.error(f"--pf {args.pf!r}: give depths 1 to 3, e.g. 1,3")
    args.pf = pfs
    path = (lambda p: Path(p) if Path(p).is_absolute() else ROOT / p)
    cfg = json.loads(path(args.config).read_text())
    spaces = build_workspaces(cfg, str(path(args.tokenizer)), Path(args.work) / "model", 4608, 8, 128, "cuda")
    won: dict[tuning.Key, tuple[str, GemvConfig]] = {}
    for rows in args.rows:
        won.update(sweep(args, spaces, rows, time.perf_counter()))
    if args.write_table is not None:
        write_table(args.write_table, won)


def write_table(dest: str, won: dict, script: str = "bench.gpu_graph_sweep") -> None:
    """Merge the winners {(rows bucket, N, K, group): (role, config)} into this GPU's table file (``dest``; "": the
    package's), its written_by the command line of ``script``."""
    gpu = torch.cuda.get_device_name()
    path = Path(dest) if dest else tuning.file_for(gpu)
    roles = {}
    table = tuning.read_table(path, roles) if path.is_file() else {}
    for key, (role, cfg) in won.items():
        table[key], roles[key] = cfg, role
    tuning.write_table(path, gpu, table, f"python -m {script} " + shlex.join(sys.argv[1:]), roles)
    log(f"{path}: {len(won)} of {len(table)} entries from this sweep")
    if os.environ.get("OUT"):
        shutil.copy(path, os.environ["OUT"])


def sweep(args, spaces, rows: int, t_start: float) -> dict[tuning.Key, tuple[str, GemvConfig]]:
    """Sweep the roles' configs in the step of ``rows`` rows -> {table key: (role, config)} for each role whose best
    config beat the one it started from."""
    eng = Engine.from_workspace(spaces["W4A16 + KV int8"], device="cuda", verify=False, batch_size=max(rows, 1))
    layers = eng.model.layers

    def lins(role):
        return [getattr(blk, ROLES[role]) for blk in layers]

    def step_us() -> tuple[float, torch.Tensor]:
        eng.decoder = eng.model.decoder = DecodeGraphs(eng.model, eng.cache)
        if rows == 1:
            times = [graph_step_us(eng, args.position, reps=100) for _ in range(3)]
            return statistics.median(times), eng.decoder.bufs.logits[:rows].float().clone()
        # the greedy replays move the rows along their own (config-dependent) tokens: compare the logits of one
        # step from a fixed state instead (positions < args.position are never written here)
        times = [rows_step_us(eng, rows, args.position) for _ in range(3)]
        return statistics.median(times), greedy_logits(eng, rows, args.position)

    base_us, base_logits = step_us()
    log(f"baseline (the kernel config table): {base_us:.1f} µs per step at position {args.position}")
    res = {"baseline_us": base_us, "position": args.position, "tried": {}}
    best = {role: lins(role)[0].config for role in ROLES}  # None: the table's entry, or tuning.rule
    cur_us = base_us  # the step with every role at its best so far
    roles = [r for r in args.roles.split(",") if r]
    for p in range(args.passes):
        for role in roles:
            lin0 = lins(role)[0]
            current = best[role] or lookup(lin0.gpu, rows, lin0.out_features, lin0.in_features, lin0.group)
            split = current.split_k if current else 1
            cands = [] if args.splits_only else candidates(role, lin0.group, split, rows, args.mma, args.pf,
                                                           args.quick)
            # several rows: qkv sums through rope; w13's last K-slice of a tile applies the SiLU-mul (both also at
            # one row in the mma kernel)
            splittable = role in RESIDUAL or (rows > 1 and role in ("qkv", "w13")) or (
                role in ("qkv", "w13") and current is not None and current.mma)
            if splittable and current is not None:  # (the mma kernel's slices may be one group each)
                cands += [replace(current, split_k=s) for s in SPLITS
                          if s != split and lin0.in_features // lin0.group >= (1 if current.mma else 2) * s]
            for c in cands:
                if time.perf_counter() - t_start > args.budget_s:
                    break
                for lin in lins(role):
                    lin.config = c
                try:
                    us, logits = step_us()
                    err = ((logits - base_logits).norm() / base_logits.norm()).item()
                except Exception as e:  # noqa: BLE001 (a config that does not compile is skipped)
                    log(f"  {role} {c}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                ok = err < 1e-2
                res["tried"].setdefault(role, []).append({"config": asdict(c), "us": us, "rel_err": err, "pass": p})
                mark = ""
                if ok and us < cur_us:
                    best[role], cur_us, mark = c, us, "  <- best"
                log(f"  pass {p} {role} {c}: {us:.1f} µs (rel err {err:.1e}){'' if ok else '  REFUSED'}{mark}")
            for lin in lins(role):
                lin.config = best[role]
    final_us, _ = step_us()
    res["final_us"] = final_us
    res["best"] = {role: asdict(c) if c else None for role, c in best.items()}
    log(f"final: {final_us:.1f} µs per step (baseline {base_us:.1f})")
    won = {}
    for role in ROLES:
        if best[role] is not None:
            lin = lins(role)[0]
            key = (tuning.rows_bucket(rows), lin.out_features, lin.in_features, lin.group)
            won[key] = (role, best[role])
            log(f"    table entry {key}: {best[role]}  ({role})")
    res.update(provenance())
    res["rows"] = rows
    out = write_result(f"gpu_graph_sweep_rows{rows}", res)
    if os.environ.get("OUT"):
        shutil.copy(out, os.environ["OUT"])
    log(f"{out}  ({time.perf_counter() - t_start:.0f}s)")
    return won


if __name__ == "__main__":
    try:
        main()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(1)
