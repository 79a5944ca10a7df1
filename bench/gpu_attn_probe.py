"""Decode attention's tiling against context length, fp16 and int8 caches (issue 5, target 3).

    python bench/gpu_attn_probe.py                    # qwen2.5-1.5b config, W4A16 (RTN g128), fp16 and int8 KV
    python bench/gpu_attn_probe.py --positions 160,4160 --rows 8

The fused attention kernel cuts a row's keys into at most ``attention.SPLIT_CAP`` splits of whole
BLOCK_N tiles (runtime/kernels/attention.py): at 4224 keys, 64 splits of 64-key tiles round up to 33 splits
of two tiles each. Each variant below (tile, warps, pipeline stages, split cap) is set for the whole model,
the decode graphs are captured again, and the graph step of one row (and of ``--rows`` distinct rows) is
timed at each position for both caches, and the relative difference of one step's logits (from zeroed
caches) from the first variant's is reported. Writes bench/results/gpu_attn_probe.json and prints the table last.
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
from gpu_graph_sweep import rows_step_us  # noqa: E402
from gpu_micro import log  # noqa: E402
from gpu_rows import WORKSPACES, build_workspaces, graph_step_us  # noqa: E402
from gpu_step_probe import fixed_logits, positions, rows_count  # noqa: E402

from qconv.runtime import cuda_graph, gpu_model  # noqa: E402
from qconv.runtime.cuda_graph import DecodeGraphs  # noqa: E402
from qconv.runtime.engine import Engine  # noqa: E402
from qconv.runtime.kernels import attention  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# name -> (FUSED_ATTENTION_KW, SPLIT_CAP[, cuda_graph.SHORT_CONTEXT]); the first is the shipped default
VARIANTS = {
    "default": (dict(gpu_model.FUSED_ATTENTION_KW), attention.SPLIT_CAP, cuda_graph.SHORT_CONTEXT),
    # short-context graphs (the splits merged in the attention kernel, no merge kernel) never, up to 1024 keys,
    # or at every length
    "no short graphs": (dict(gpu_model.FUSED_ATTENTION_KW), attention.SPLIT_CAP, 0),
    "short to 256": (dict(gpu_model.FUSED_ATTENTION_KW), attention.SPLIT_CAP, 256),
    "short to 1024": (dict(gpu_model.FUSED_ATTENTION_KW), attention.SPLIT_CAP, 1024),
    "short everywhere": (dict(gpu_model.FUSED_ATTENTION_KW), attention.SPLIT_CAP, 1 << 30),
    "bn128 w8": ({"block_n": 128, "num_warps": 8}, attention.SPLIT_CAP),
    # 128-key tiles over splits of whole 64-key pieces: as many splits as 64-key tiles at short contexts
    "bn128 w8 round64": ({"block_n": 128, "num_warps": 8, "split_round": 64}, attention.SPLIT_CAP),
    "bn64 w8 cap128": ({"block_n": 64, "num_warps": 8}, 128),
    "bn64 w8 stages3": ({"block_n": 64, "num_warps": 8, "num_stages": 3}, attention.SPLIT_CAP),
    "bn64 w8 stages1": ({"block_n": 64, "num_warps": 8, "num_stages": 1}, attention.SPLIT_CAP),
    "bn32 w4 cap128": ({"block_n": 32, "num_warps": 4}, 128),
    # a split of 64 < keys <= 128 (one row past 4096 tokens) as one 128-key tile; the narrow loop elsewhere
    "bn64 w8 wide": ({"block_n": 64, "num_warps": 8, "wide": True}, attention.SPLIT_CAP),
    # int8 tiles converted after shared memory (attention._int8_as), with and without the wide tile
    "bn64 w8 i8 smem": ({"block_n": 64, "num_warps": 8, "int8_in_registers": False}, attention.SPLIT_CAP),
    "bn64 w8 wide i8 smem": ({"block_n": 64, "num_warps": 8, "wide": True, "int8_in_registers": False},
                             attention.SPLIT_CAP),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=".carry/configs/qwen2.5-1.5b.json")
    ap.add_argument("--tokenizer", default=".carry/qwen-tokenizer")
    ap.add_argument("--work", default="/tmp/qconv-gpu-bench")
    ap.add_argument("--positions", type=positions, default=[160, 1056, 4160])
    ap.add_argument("--rows", type=rows_count, default=8, help="the several-row step's distinct rows (2..16)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--workspaces", default="W4A16,W4A16 + KV int8", help="comma list of: " + ", ".join(WORKSPACES))
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    if not names or any(v not in VARIANTS for v in names):
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")
    workspaces = [w for w in args.workspaces.split(",") if w]
    if not workspaces or any(w not in WORKSPACES for w in workspaces):
        ap.error(f"--workspaces: a comma list of {', '.join(WORKSPACES)}")
    t0 = time.perf_counter()
    path = (lambda p: Path(p) if Path(p).is_absolute() else ROOT / p)
    cfg = json.loads(path(args.config).read_text())
    spaces = build_workspaces(cfg, str(path(args.tokenizer)), Path(args.work) / "model", 4608, 8, 128, "cuda")
    res = {"positions": args.positions, "rows": args.rows, "variants": {}}
    for ws in workspaces:
        eng = Engine.from_workspace(spaces[ws], device="cuda", verify=False, batch_size=args.rows)
        ref = None
        for name in names:
            kw, cap, *short = VARIANTS[name]
            gpu_model.FUSED_ATTENTION_KW, attention.SPLIT_CAP = kw, cap
            cuda_graph.SHORT_CONTEXT = short[0] if short else VARIANTS["default"][2]
            eng.decoder = eng.model.decoder = DecodeGraphs(eng.model, eng.cache)
            r = {"splits_1": eng.decoder.bufs.splits[1]}
            for p in args.positions:
                r[f"1@{p}"] = graph_step_us(eng, p, reps=100)
                r[f"{args.rows}@{p}"] = rows_step_us(eng, args.rows, p, reps=50)
            logits = fixed_logits(eng, args.rows, args.positions[-1])
            ref = logits if ref is None else ref
            r["rel_err"] = ((logits - ref).norm() / ref.norm()).item()
            res["variants"].setdefault(ws, {})[name] = r
            log(f"  {ws} {name}: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in r.items()))
        gpu_model.FUSED_ATTENTION_KW, attention.SPLIT_CAP, cuda_graph.SHORT_CONTEXT = VARIANTS["default"]
        del eng
        torch.cuda.empty_cache()
        save_device_result("gpu_attn_probe", res)  # after each workspace: a run cut short keeps what it measured
    out = save_device_result("gpu_attn_probe", res)
    cols = [f"{n}@{p}" for p in args.positions for n in (1, args.rows)]
    print(f"\n{out}  ({time.perf_counter() - t0:.0f}s)  {res['device']}\n")
    print("| cache | variant | " + " | ".join(f"{c} µs" for c in cols) + " | rel err |")
    print("|---|---|" + "---|" * (len(cols) + 1))
    for ws, vs in res["variants"].items():
        for name, r in vs.items():
            print(f"| {ws} | {name} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + f" | {r['rel_err']:.1e} |")


if __name__ == "__main__":
    main()
