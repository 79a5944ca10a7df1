"""The decode kernels compiled for the H100 / H200 (sm_90a) on a machine without a GPU: registers, spills,
shared memory and the machine code, at no device time (issue 5).

    python bench/sass.py                      # every role below: a resource table
    python bench/sass.py w13x8 --sass out.txt # one role, its SASS written to a file, the hot loop's histogram

A role's launch is recorded by calling the runtime's own entry point (kernels/gemv_int4.w4_matmul,
kernels/attention.decode_attention_fused) on CPU tensors of the decode shapes, then built for sm_90a with
PDL on (runtime/kernels/offline.py).
"""
from __future__ import annotations

import argparse
import dataclasses
from collections import Counter
from pathlib import Path

import torch

from qconv.convert.layout import group_major
from qconv.runtime.kernels import attention, gemv_int4
from qconv.runtime.kernels.offline import (as_on_gpu, compile_sm90, hot_loop, instructions, opcode, record,
                                           resources)

SHAPES = {"qkv": (2048, 1536), "o": (1536, 1536), "w13": (17920, 1536), "w2": (1536, 8960)}


def gemv_role(role: str, rows: int, cfg: gemv_int4.GemvConfig | None = None, silu_x: bool = False):
    """The int4 GEMV launch of a decode role at ``rows`` rows, with ``cfg`` or TUNED's config as the runtime
    takes it; ``silu_x``: w13 adds its K-slices into fp32 sums (no SiLU-mul) and w2 applies it to them."""
    N, K, G = *SHAPES[role], 128
    epi = {"qkv": "residual" if rows > 1 else "store", "o": "residual", "w13": "residual" if silu_x else "silu",
           "w2": "residual"}[role]
    pro = "rmsnorm" if role in ("qkv", "w13") and rows == 1 else ("silu" if role == "w2" and silu_x else "none")
    x = torch.zeros(rows, 2 * K if pro == "silu" else K, dtype=torch.float16 if pro == "none" else torch.float32)
    n_out = N // 2 if epi == "silu" else N
    out = torch.zeros(rows, n_out, dtype=torch.float32 if epi == "residual" else torch.float16)
    words = group_major(torch.zeros(N, K // 8, dtype=torch.int32), G)  # the runtime's layout
    s, z = torch.zeros(N, K // G, dtype=torch.float16), torch.zeros(N, K // G, dtype=torch.uint8)
    nw = torch.ones(K, dtype=torch.float16) if pro == "rmsnorm" else None
    bias = torch.zeros(N, dtype=torch.float16) if role == "qkv" and rows == 1 else None
    cfg = cfg or gemv_int4.default_config(rows, N, K, G, epi, prologue=pro)
    if epi == "store":  # (one row's qkv: no split-K)
        cfg = dataclasses.replace(cfg, split_k=1)
    if cfg.mma:  # the GPU's path (w4_matmul takes the fallback for CPU tensors); its norm a separate kernel
        if pro == "rmsnorm" and not cfg.fuse_norm:  # unless the config fuses it
            x = x.half()
            pro, nw = "none", None
        with as_on_gpu():
            return record(gemv_int4.mma_int4, "_w4_mma_kernel", lambda: gemv_int4.w4_matmul(
                x, words, s, z, G, out, bias=bias, prologue=pro, norm_weight=nw, eps=1e-6, epilogue=epi,
                config=cfg, dtype=torch.float16))
    name = "_w4_tc_kernel" if cfg.tc else ("_w4_gemm_kernel" if cfg.dot else "_w4_gemv_kernel")
    return record(gemv_int4, name, lambda: gemv_int4.w4_matmul(x, words, s, z, G, out, bias=bias, prologue=pro,
                                                               norm_weight=nw, eps=1e-6, epilogue=epi, config=cfg))


def attention_role(rows: int, quant: bool, block_n: int = 64, num_warps: int = 4):
    """The fused rope + attention kernel of a qwen2.5-1.5b decode step (12 / 2 heads, D 128, 4608 positions)."""
    HQ, HKV, D, S = 12, 2, 128, 4608
    qkv = torch.zeros(rows, (HQ + 2 * HKV) * D, dtype=torch.float32)
    pos, slot = torch.zeros(rows, dtype=torch.int32), torch.arange(rows, dtype=torch.int32)
    cache = torch.zeros(rows, HKV, S, D, dtype=torch.int8 if quant else torch.float16)
    cos = torch.zeros(S, D)
    kvp = torch.ones(4, HKV) if quant else None
    out = torch.zeros(rows, HQ * D, dtype=torch.float16)
    return record(attention, "_attn_fused_kernel", lambda: attention.decode_attention_fused(
        qkv, pos, slot, cos, cos, cache, cache, HQ, out, kv_params=kvp, merge=False, sums=True, block_n=block_n,
        num_warps=num_warps), others=("_attn_combine_kernel",))


MMA = {role: gemv_int4.GemvConfig(bn, split, warps, dot=True, mma=True)  # (bench/gpu_graph_sweep.py --mma sweeps)
       for role, (bn, split, warps) in {"qkv": (64, 4, 4), "o": (64, 4, 4), "w13": (128, 1, 4), "w2": (64, 9, 4)}.items()}
ROLES = {**{f"{r}x{m}": (lambda r=r, m=m: gemv_role(r, m)) for r in SHAPES for m in (1, 8)},
         **{f"{r}x{m}-mma": (lambda r=r, m=m: gemv_role(r, m, MMA[r])) for r in SHAPES for m in (1, 8, 16)},
         **{f"{r}x{m}-silu": (lambda r=r, m=m: gemv_role(r, m, silu_x=True)) for r in ("w13", "w2") for m in (1, 8)},
         "attn-int8": lambda: attention_role(1, True), "attn-fp16": lambda: attention_role(1, False),
         "attn-int8-bn128": lambda: attention_role(1, True, 128, 8)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("roles", nargs="*", default=list(ROLES), help=f"of {', '.join(ROLES)}")
    ap.add_argument("--sass", help="write the (last) role's SASS to this file")
    args = ap.parse_args()
    bad = [r for r in args.roles if r not in ROLES]
    if bad:
        ap.error(f"unknown role(s) {', '.join(bad)}; choose from {', '.join(ROLES)}")
    print("| role | kernel | grid | warps | regs | stack / local B | shared B | SASS instr | hot-loop instr |")
    print("|---|---|---|---|---|---|---|---|---|")
    for role in args.roles:
        fn, grid, a, kw = ROLES[role]()
        ck = compile_sm90(fn, a, kw)
        res = resources(ck.asm["cubin"])
        instrs = instructions(ck.asm["cubin"])
        loop = hot_loop(instrs)
        print(f"| {role} | {fn.__name__} | {tuple(grid)} | {ck.metadata.num_warps} | {res['REG']} | "
              f"{res['STACK']} / {res['LOCAL']} | {ck.metadata.shared} | {len(instrs)} | {len(loop)} |")
        if args.sass and role == args.roles[-1]:
            Path(args.sass).write_text("\n".join(f"/*{a:04x}*/ {t}" for a, t in instrs) + "\n")
            hist = Counter(opcode(t) for t in loop)
            print(f"\nhot loop of {role}: " + ", ".join(f"{k} {v}" for k, v in hist.most_common(30)))


if __name__ == "__main__":
    main()
