"""int4 kernel configs across model shapes (issue 28): for every decode role of the given configs and rows M, each
candidate config timed alone, fused as a decode step runs it (GpuLinear.run: its RMSNorm, split-K sums, SiLU-mul),
beside the config the rule picks, the one the GPU's table picks, torch's tinygemm and cuBLAS fp16 (``--peers``: also
gemlite and torchao, bench.peers).

    python3 -m bench.kernel_sweep --configs .carry/configs --sizes qwen2.5-7b,llama-3-8b [--rows 1,8,16]
    python3 -m bench.kernel_sweep ... --write-table      # the winners into this GPU's table (package data)
    python3 -m bench.kernel_sweep --report [JSON]        # the table of a sweep's JSON (default: the last run's)

Every timing is a CUDA graph of one call per weight copy, with enough copies to overflow L2 twice (bench.gpu_micro):
µs per call = replay time / copies. Effective TB/s = int4 codes + scales + zeros (or fp16 weights) / time; the
limit is the run's D2D copy bandwidth. Each rows bucket of the table (1; 2-8; more) takes the config with the
least summed time over the swept rows counts in it. A candidate whose output differs from the dequantized
reference is refused.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import RESULTS, log, provenance, write_result
from bench.gpu_graph_sweep import write_table
from bench.gpu_micro import _tinygemm, _try, copies_for, graph_us, shapes_of
from bench.gpu_runtime import copy_bandwidth
from bench.peers import kernel_rows
from qconv.convert.layout import QuantLinear, rows_major
from qconv.runtime.cuda.kernels import tuning
from qconv.runtime.cuda.kernels.tuning import GemvConfig
from qconv.runtime.cuda.kernels.w4_matmul import sum_buffers
from qconv.runtime.cuda.linear import DequantScratch, GpuLinear

ROOT = Path(__file__).resolve().parent.parent
SIZES = ("qwen2.5-7b", "llama-3-8b", "qwen2.5-14b", "qwen2.5-32b", "llama-2-7b", "qwen3-8b", "qwen2.5-1.5b",
         "qwen2.5-0.5b")
MMA_TILES = ((32, 2), (64, 2), (64, 4), (128, 4), (128, 8), (256, 8), (64, 1), (128, 2))  # (outputs, warps)


def splits_for(n_blocks: int, groups: int, sms: int, one_row: bool) -> list[int]:
    """K-slices that give about 1, 2 and 4 (one row: also 8) programs per SM, each slice one group or more."""
    want = (1, 2, 4, 8) if one_row else (1, 2, 4)
    out = {1}
    for t in want:
        out.add(max(1, min(groups, round(t * sms / n_blocks))))
    return sorted(out)


def candidates(role: str, N: int, K: int, M: int, group: int, sms: int, pfs=(1, 3)) -> list[GemvConfig]:
    """The mma kernel's tiles x prefetch depth x K-slices, the one-row GEMV's shapes, and _gemm tiles for rows."""
    groups = K // group
    out = []
    if group == 128:
        for bn, w in MMA_TILES:
            for s in splits_for(-(-N // bn), groups, sms, M == 1):
                out += [GemvConfig(bn, s, w, dot=True, mma=True, pf=pf) for pf in pfs]
    residual = role in ("o", "w2")
    if M == 1:
        wg = group // 8
        for bn in (4, 8, 16):
            for v in (2, 4):
                for w in (1, 2):
                    if wg % v == 0 and (32 * w) % (wg // v) == 0:
                        splits = splits_for(-(-N // bn), groups, sms, True) if residual else [1]
                        out += [GemvConfig(bn, s, w, 1, False, v) for s in splits]
    else:
        for bn in (32, 64, 128):
            splits = splits_for(-(-N // bn), groups, sms, False) if residual else [1]
            out += [GemvConfig(bn, s, 4, 3, True) for s in splits]
    return list(dict.fromkeys(out))


class Role:
    """A decode role's linear in ``copies`` weight copies and the buffers of a step of M rows; ``run(i)`` calls copy i
    as models/decode_step does (kernels chosen by each copy's config or, config None, by its gpu's table / the rule)."""

    def __init__(self, role: str, N: int, K: int, M: int, group: int, sms: int, dev):
        self.role, self.N, self.K, self.M = role, N, K, M
        codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, device=dev)
        scale = torch.rand(N, K // group, device=dev) * 0.02 + 0.001
        zero = torch.randint(0, 16, (N, K // group), device=dev).float()
        base = GpuLinear(QuantLinear(codes, scale, zero), None, dev, torch.float16, DequantScratch(dev, torch.float16),
                         sms, gpu=None)
        del codes
        self.int4_bytes = N * K // 2 + N * (K // group) * 3
        self.lins = [base] + [copy.deepcopy(base) for _ in range(copies_for(self.int4_bytes) - 1)]
        self.nw = torch.rand(K, device=dev).half() + 0.5
        self.x32 = torch.randn(M, K, device=dev)                 # the fp32 residual (RMSNorm roles' input)
        self.x16 = torch.randn(M, K, device=dev).half()          # o's attention output, w2's SiLU-mul
        self.res = torch.zeros(M, N, device=dev)                 # the residual o and w2 add into
        self.acc = torch.zeros(M, N, device=dev)                 # qkv's / w13's split-K sums
        self.out = torch.empty(M, N // 2 if role == "w13" else N, device=dev, dtype=torch.float16)
        self.sums = sum_buffers(M, N, dev)

    def set(self, config: GemvConfig | None, gpu: str | None) -> None:
        for lin in self.lins:
            lin.config, lin.gpu = config, gpu

    def step_config(self) -> GemvConfig:
        """The config copy 0 runs with, as ``run`` calls it (epilogue and prologue as the decode step's)."""
        lin = self.lins[0]
        if self.role in ("qkv", "w13"):
            epi = "residual" if lin.accumulates(self.M) else ("store" if self.role == "qkv" else "silu")
            return lin.kernel_config(self.M, epi, "rmsnorm")
        return lin.kernel_config(self.M, "residual")

    def run(self, i: int) -> None:
        lin = self.lins[i]
        if self.role == "qkv":
            acc = lin.accumulates(self.M)
            lin.run(self.x32, self.acc if acc else self.out, prologue="rmsnorm", norm_weight=self.nw, eps=1e-6,
                    epilogue="residual" if acc else "store")
        elif self.role == "w13":
            if lin.accumulates(self.M):
                lin.run(self.x32, self.acc, prologue="rmsnorm", norm_weight=self.nw, eps=1e-6, epilogue="accumulate")
            else:
                lin.run(self.x32, self.out, prologue="rmsnorm", norm_weight=self.nw, eps=1e-6, epilogue="silu",
                        sums=self.sums)
        else:
            lin.run(self.x16, self.res, epilogue="residual")

    def output(self) -> torch.Tensor:
        """Copy 0's result from zeroed buffers, as the fp32 pre-epilogue sums where an epilogue is not linear."""
        for t in (self.acc, self.res):
            t.zero_()
        self.run(0)
        torch.cuda.synchronize()
        lin = self.lins[0]
        if self.role in ("o", "w2"):
            return self.res.clone()
        if self.role == "qkv":
            return (self.acc if lin.accumulates(self.M) else self.out).float().clone()
        return self.acc.clone() if lin.accumulates(self.M) else self.out.float().clone()

    def reference(self, silu_sums: bool) -> torch.Tensor:
        lin = self.lins[0]
        w = lin.dequantized().float()
        if self.role in ("qkv", "w13"):
            x = self.x32
            h = (self.nw.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).half().float())
            y = h.half().float() @ w.t()
            if self.role == "w13" and not silu_sums:
                return F.silu(y[:, 0::2].half().float()) * y[:, 1::2].half().float()
            return y
        return self.x16.float() @ w.t()

    def close(self):
        del self.lins
        torch.cuda.empty_cache()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


def sweep_shape(role: str, N: int, K: int, rows: list[int], group: int, sms: int, gpu: str, deadline: float) -> dict:
    """Every candidate at each M of ``rows`` -> {M: {rule_us, table_us, best_us, best, top, tinygemm_us, cublas_us}}."""
    dev = torch.device("cuda")
    res = {}
    for M in rows:
        r = Role(role, N, K, M, group, sms, dev)
        refs = {False: r.reference(False)}
        if role == "w13":
            refs[True] = r.reference(True)
        n = len(r.lins)
        row = {"N": N, "K": K, "M": M, "int4_bytes": r.int4_bytes, "copies": n}
        r.set(None, None)
        row["rule"] = asdict(r.step_config())
        rule_us = [graph_us(r.run, n)]
        hit = tuning.lookup(gpu, M, N, K, group)
        if hit is not None:
            r.set(None, gpu)
            row["table_us"] = graph_us(r.run, n)
        timed, refused = [], 0
        for c in candidates(role, N, K, M, group, sms):
            if time.perf_counter() > deadline:
                row["cut_short"] = True
                break
            r.set(c, None)
            try:
                acc = r.lins[0].accumulates(M)
                err = rel_err(r.output(), refs[role == "w13" and acc])
                if err > 1e-2:
                    refused += 1
                    continue
                timed.append((graph_us(r.run, n), c))
            except Exception as e:  # noqa: BLE001  (a config that does not compile or launch is skipped)
                log(f"    {role} M={M} {c}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
        r.set(None, None)  # the rule again, after the candidates (its first timing ran on a cold GPU)
        rule_us.append(graph_us(r.run, n))
        row["rule_us"] = min(rule_us)
        timed.sort(key=lambda t: t[0])
        row["tried"], row["refused"] = len(timed), refused
        row["timed"] = [(round(us, 2), asdict(c)) for us, c in timed]
        if timed:
            row["best_us"], row["best"] = timed[0][0], asdict(timed[0][1])
        # peers: torch's tinygemm (bf16) and cuBLAS on fp16 weights
        words = [rows_major(lin.words) for lin in r.lins]
        h = torch.randn(M, K, device=dev, dtype=torch.float16)
        want = h.float() @ r.lins[0].dequantized().float().t()
        row.update(_tinygemm(h, words, [lin.scales for lin in r.lins], [lin.zeros for lin in r.lins], group, want, n))
        r.close()
        del words
        nd = copies_for(N * K * 2)
        dense = [torch.randn(N, K, device=dev, dtype=torch.float16) * 0.02 for _ in range(nd)]
        row["cublas_us"] = _try(lambda: graph_us(lambda i: F.linear(h, dense[i]), nd))
        row["fp16_bytes"] = N * K * 2
        dense.clear()
        torch.cuda.empty_cache()
        log(f"  {role:4s} [{N}x{K}] M={M}: rule {row['rule_us']:.1f}"
            + (f", table {row['table_us']:.1f}" if "table_us" in row else "")
            + (f", best {row['best_us']:.1f} µs ({r.int4_bytes / row['best_us'] / 1e6:.2f} TB/s) of {len(timed)}"
               if timed else "") + f", tinygemm {row.get('tinygemm_us', float('nan')):.1f}"
            + (f", cuBLAS fp16 {row['cublas_us']:.1f}" if isinstance(row["cublas_us"], float) else ""))
        res[M] = row
    return res


def winners(shapes: list[dict], group: int) -> dict[tuning.Key, tuple[str, GemvConfig]]:
    """{(rows bucket, N, K, group): (role, config)}: for each rows bucket (tuning.rows_bucket) that the sweep
    timed, the config with the least summed time over its rows counts, among those timed at each of them."""
    won = {}
    for s in shapes:
        buckets: dict[int, list[dict]] = {}
        for m, r in s["rows"].items():
            buckets.setdefault(tuning.rows_bucket(int(m)), []).append(r)
        for bucket, rs in buckets.items():
            totals: dict[str, list[float]] = {}
            for r in rs:
                for us, c in r.get("timed", []):
                    totals.setdefault(json.dumps(c, sort_keys=True), []).append(us)
            full = {c: sum(t) for c, t in totals.items() if len(t) == len(rs)}
            if full:
                won[(bucket, s["N"], s["K"], group)] = (s["role"], GemvConfig(**json.loads(min(full, key=full.get))))
    return won


def peer_cell(times: dict, m) -> str:
    """A peer's µs at m rows, or why it did not run."""
    v = times.get(str(m), times.get(int(m), times.get("error", "–")))
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def report(res: dict) -> str:
    bw = res["copy_bandwidth"]
    lines = [f"copy bandwidth {bw / 1e12:.2f} TB/s; µs per call (TB/s, % of copy)",
             "| shape (role [N×K]) | M | rule | table | best of sweep | tinygemm | cuBLAS fp16 | rule / best "
             "| peers µs |",
             "|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for s in res["shapes"]:
        if (s["N"], s["K"]) in seen:
            continue
        seen.add((s["N"], s["K"]))
        for m, r in s["rows"].items():
            def cell(k, nbytes=r["int4_bytes"]):
                v = r.get(k)
                return f"{v:.1f} ({nbytes / v / 1e6:.2f}, {100 * nbytes / v / 1e6 / (bw / 1e12):.0f}%)" \
                    if isinstance(v, float) else "–"
            ratio = f"{r['rule_us'] / r['best_us']:.2f}" if "best_us" in r else "–"
            peers = "; ".join(f"{p} {peer_cell(v, m)}" for p, v in s.get("peers", {}).items())
            lines.append(f"| {s['size']} {s['role']} [{s['N']}×{s['K']}] | {m} | {cell('rule_us')} | "
                         f"{cell('table_us')} | {cell('best_us')} | {cell('tinygemm_us')} | "
                         f"{cell('cublas_us', r['fp16_bytes'])} | {ratio} | {peers} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=".carry/configs", help="a folder of HF config.json files named SIZE.json")
    ap.add_argument("--sizes", default=",".join(SIZES[:4]), help="comma-separated config names; shapes seen once")
    ap.add_argument("--roles", default="qkv,o,w13,w2")
    ap.add_argument("--rows", default="1,8,16", help="rows M per call, comma-separated")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--budget-s", type=float, default=480, help="stop trying candidates after this many seconds")
    ap.add_argument("--write-table", nargs="?", const="", default=None, metavar="JSON",
                    help="merge the winners into this GPU's kernel config table (default: the package's)")
    ap.add_argument("--peers", action="store_true", help="also time gemlite and torchao per shape (bench.peers)")
    ap.add_argument("--report", nargs="?", const=str(RESULTS / "kernel_sweep.json"), metavar="JSON",
                    help="print the table of a sweep's JSON (default bench/results/kernel_sweep.json) and exit")
    args = ap.parse_args()
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return
    rows = [int(m) for m in args.rows.split(",")]
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    gpu = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res = {**provenance(), "copy_bandwidth": copy_bandwidth(), "group": args.group, "rows_counts": rows,
           "shapes": []}
    log(f"{gpu}, {sms} SMs, D2D copy {res['copy_bandwidth'] / 1e12:.2f} TB/s")
    seen, out = set(), None
    for size in args.sizes.split(","):
        cfg = json.loads((ROOT / args.configs / f"{size}.json").read_text())
        for role, (N, K) in shapes_of(cfg).items():
            if role not in args.roles.split(",") or (role, N, K) in seen or time.perf_counter() > deadline:
                continue
            seen.add((role, N, K))
            shape = {"size": size, "role": role, "N": N, "K": K,
                     "rows": sweep_shape(role, N, K, rows, args.group, sms, gpu, deadline)}
            if args.peers:
                shape["peers"] = kernel_rows(N, K, rows, args.group)
                log(f"    peers: {shape['peers']}")
            res["shapes"].append(shape)
            out = write_result("kernel_sweep", res)
    if os.environ.get("OUT") and out is not None:
        shutil.copy(out, os.environ["OUT"])
    if args.write_table is not None:
        write_table(args.write_table, winners(res["shapes"], args.group), "bench.kernel_sweep")
    log(f"{time.perf_counter() - t0:.0f}s")
    print(report(res))


if __name__ == "__main__":
    main()
