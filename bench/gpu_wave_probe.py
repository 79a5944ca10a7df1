"""Do the several-row GEMVs run in one wave? (issue 5, target 4)

    python bench/gpu_wave_probe.py

An H100 / H200 has 132 SMs. The eight-row w13 (_w4_tc_kernel, 128 outputs, 8 warps) launches 140 programs and
w2 (split 18) 216: if a program's registers let only one of them sit on an SM, the last 8 (84) run as a second
wave and the kernel takes about twice one program's time. This probe times each GEMV alone (a CUDA graph of
calls over enough weight copies to overflow L2, gpu_micro.graph_us) while the number of programs changes: w13
with N = 66 .. 264 blocks of 128 outputs, w2 with 6 .. 32 K-slices, each at its shipped config and with the
register cap ``maxnreg`` (two 8-warp programs per SM need <= 128 registers per thread), and prints the
compiled kernels' registers, spills and shared memory. One row's w13 GEMV (one-warp programs, at most 32
blocks per SM) is timed at 4224 and 4480 programs too. Writes bench/results/gpu_wave_probe.json.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_device_result  # noqa: E402
from gpu_micro import copies_for, graph_us, log  # noqa: E402

from qconv.runtime.kernels import gemv_int4  # noqa: E402
from qconv.runtime.kernels.gemv_int4 import TUNED, w4_matmul  # noqa: E402


def compiled(kernel) -> list[dict]:
    """Registers, spills and shared bytes of every compiled variant of a Triton kernel so far."""
    out = []
    for cache in kernel.device_caches.values():
        for k in cache[0].values():
            out.append({"regs": k.n_regs, "spills": k.n_spills, "shared": k.metadata.shared,
                        "warps": k.metadata.num_warps, "maxnreg": getattr(k.metadata, "maxnreg", None)})
    return out


def time_gemv(M: int, N: int, K: int, epilogue: str, cfg, group: int = 128) -> float:
    gen = torch.Generator(device="cuda").manual_seed(0)
    nbytes = N * K // 2 + N * (K // group) * 3
    copies = copies_for(nbytes)
    words = [torch.randint(-2**31, 2**31 - 1, (N, K // 8), device="cuda", dtype=torch.int32, generator=gen)
             for _ in range(copies)]
    scales = [torch.rand(N, K // group, device="cuda", generator=gen).half() * 0.01 for _ in range(copies)]
    zeros = [torch.randint(0, 16, (N, K // group), device="cuda", dtype=torch.uint8, generator=gen)
             for _ in range(copies)]
    x = torch.randn(M, K, device="cuda", generator=gen).half() * 0.1
    out = torch.zeros(M, N // 2 if epilogue == "silu" else N, device="cuda",
                      dtype=torch.float32 if epilogue == "residual" else torch.float16)
    return graph_us(lambda i: w4_matmul(x, words[i], scales[i], zeros[i], group, out, epilogue=epilogue, config=cfg),
                    copies)


def main():
    t0 = time.perf_counter()
    res = {"w13": [], "w2": [], "w13_one_row": []}
    w13 = TUNED[(16, 17920, 1536)]
    for cap in (None, 128):
        cfg = dataclasses.replace(w13, maxnreg=cap)
        for blocks in (66, 120, 132, 133, 140, 198, 264):
            us = time_gemv(8, blocks * 128, 1536, "silu", cfg)
            r = {"blocks": blocks, "maxnreg": cap, "us": us, "us_per_17920": us * 140 / blocks}
            res["w13"].append(r)
            log(f"w13 8 rows, {blocks} programs, maxnreg {cap}: {us:.2f} µs")
    w2 = TUNED[(16, 1536, 8960)]
    for cap in (None, 128):
        for split in (6, 9, 11, 12, 18, 22, 32):
            cfg = dataclasses.replace(w2, split_k=split, maxnreg=cap)
            us = time_gemv(8, 1536, 8960, "residual", cfg)
            res["w2"].append({"split": split, "programs": 12 * split, "maxnreg": cap, "us": us})
            log(f"w2 8 rows, split {split} ({12 * split} programs), maxnreg {cap}: {us:.2f} µs")
    one = TUNED[(1, 17920, 1536)]
    for n in (16896, 17920):
        us = time_gemv(1, n, 1536, "silu", one)
        res["w13_one_row"].append({"N": n, "programs": n // one.block_n, "us": us, "us_per_17920": us * 17920 / n})
        log(f"w13 one row, N {n} ({n // one.block_n} programs): {us:.2f} µs")
    res["tc_kernels"] = compiled(gemv_int4._w4_tc_kernel)
    res["gemv_kernels"] = compiled(gemv_int4._w4_gemv_kernel)
    out = save_device_result("gpu_wave_probe", res)
    print(f"\n{out}  ({time.perf_counter() - t0:.0f}s)  {res['device']}")
    print("compiled _w4_tc_kernel:", res["tc_kernels"])
    print("compiled _w4_gemv_kernel:", res["gemv_kernels"])
    print("\n| GEMV | programs | maxnreg | µs | µs scaled to the real shape |\n|---|---|---|---|---|")
    for r in res["w13"]:
        print(f"| w13 8 rows | {r['blocks']} | {r['maxnreg']} | {r['us']:.2f} | {r['us_per_17920']:.2f} |")
    for r in res["w2"]:
        print(f"| w2 8 rows, split {r['split']} | {r['programs']} | {r['maxnreg']} | {r['us']:.2f} | {r['us']:.2f} |")
    for r in res["w13_one_row"]:
        print(f"| w13 one row | {r['programs']} | - | {r['us']:.2f} | {r['us_per_17920']:.2f} |")


if __name__ == "__main__":
    main()
