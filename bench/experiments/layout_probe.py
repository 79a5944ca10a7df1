"""Is the one-row int4 step held back by how the weights sit in HBM? (issue 5, eleventh sitting)

    python bench/experiments/layout_probe.py

The mma kernel (runtime/kernels/mma_int4.py) reads, per group, 64 bytes of each of its rows: in the row-major
words [N, K/8] those pieces are K/2 bytes apart (768 B for w13, 4480 B for w2), so every 64-byte piece sits
in a different stretch of DRAM. Group-major words [K/G, N, G/8] put one group of all rows together: a warp's
16 rows are one contiguous KB. Same kernel, same config, only the strides differ. Also: w13's SiLU-mul under
split-K (atomics, a fence, a counter, the last slice reads the sums back) against the same slices adding into
fp32 sums only, to price that tail. Each call alone in a CUDA graph over enough weight copies to overflow L2.
Prints a table; writes bench/results/layout_probe.json.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import save_device_result  # noqa: E402
from gpu_micro import copies_for, graph_us, log  # noqa: E402
from gpu_mma_probe import ROLES, weights  # noqa: E402

from qconv.runtime.kernels import mma_int4  # noqa: E402
from qconv.runtime.kernels.gemv_int4 import TUNED, GemvConfig, sum_buffers  # noqa: E402

EPI = {"store": 0, "residual": 1, "silu": 2}


def group_major(words: torch.Tensor, group: int = 128) -> torch.Tensor:
    N, KW = words.shape
    return words.view(N, KW // (group // 8), group // 8).transpose(0, 1).contiguous()


def run(role: str, M: int, layout: str, epi: str | None = None, cfg=None, check: bool = False):
    N, K, epi0 = ROLES[role]
    epi = epi or ("residual" if role == "qkv" and M > 1 else epi0)
    cfg = cfg or TUNED[(1 if M == 1 else 16, N, K)]
    if not cfg.mma:  # (one row's qkv is a CUDA-core GEMV: an mma tile instead)
        cfg = GemvConfig(64, 1, 4, dot=True, mma=True)
    nbytes = N * K // 2 + N * (K // 128) * 3
    copies = copies_for(nbytes)
    words, s, z, _, more = weights(N, K, 7, copies)
    ws = [words] + more
    if layout == "group":
        ws = [group_major(w) for w in ws]
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(M, K, device="cuda", generator=g).half()
    silu = epi == "silu"
    out = torch.zeros(M, N // 2 if silu else N, device="cuda", dtype=torch.float16 if epi != "residual" else torch.float32)
    sums = sum_buffers(M, N, "cuda") if silu and cfg.split_k > 1 else None

    def call(i):
        mma_int4.launch(x, ws[i], s, z, 128, out, None, EPI[epi], cfg.split_k, cfg.num_warps, cfg.block_n, False,
                        True, sums, None, 0.0, cfg.pf)
    if check:
        out.zero_()
        call(0)
        torch.cuda.synchronize()
        return out.float().clone()
    return graph_us(call, copies)


def main():
    t0 = time.perf_counter()
    res = {"command": "python3 bench/experiments/layout_probe.py", "us": {}, "max_abs_diff": {}}
    for M in (1, 8):
        for role in ROLES:
            a, b = run(role, M, "rows", check=True), run(role, M, "group", check=True)
            res["max_abs_diff"][f"{role} M={M}"] = (a - b).abs().max().item()
            for layout in ("rows", "group"):
                res["us"][f"{role} M={M} {layout}"] = run(role, M, layout)
            if role == "w13":  # the split SiLU tail: the same slices adding into fp32 sums only
                for layout in ("rows", "group"):
                    res["us"][f"w13 M={M} {layout} sums-only"] = run(role, M, layout, epi="residual")
            log(f"  {role} M={M}: " + ", ".join(f"{k.split(' ', 2)[2]} {v:.2f}" for k, v in res["us"].items()
                                                 if k.startswith(f"{role} M={M} ")))
            save_device_result("layout_probe", res)
    res["wall_s"] = time.perf_counter() - t0
    save_device_result("layout_probe", res)
    log("| role | rows-major µs | group-major µs | max |diff| |")
    log("|---|---|---|---|")
    for M in (1, 8):
        for role in ROLES:
            k = f"{role} M={M}"
            log(f"| {k} | {res['us'][k + ' rows']:.2f} | {res['us'][k + ' group']:.2f} | {res['max_abs_diff'][k]:.2e} |")
        log(f"| w13 M={M} sums only | {res['us'][f'w13 M={M} rows sums-only']:.2f} | "
            f"{res['us'][f'w13 M={M} group sums-only']:.2f} | |")


if __name__ == "__main__":
    main()
