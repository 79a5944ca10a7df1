"""The mma.sync int4 kernel (runtime/kernels/mma_int4.py) on the GPU: right first, then timed alone (issue 5).

    python bench/gpu_mma_probe.py                 # ~2-3 min on an H100: correctness table, then timings
    python bench/gpu_mma_probe.py --skip-timing

[1] Correctness: every epilogue (store + bias, residual with and without split-K, SiLU-mul with one slice and
    with split-K), fp16 and bf16, 1 to 40 rows (one or several row blocks of 8 / 16), outputs that do not
    fill the last tile, against the dequantized weights in fp32 on the GPU; outputs poisoned with NaN first.
    The weights loaded 2 and 3 groups ahead (pf), and the RMSNorm inside the kernel (fuse_norm: a residual
    with channels up to ~400 against the norm rounded as the dense model rounds it).
[2] Each decode role of the qwen2.5-1.5b config at 8 rows and at 1 row, alone (a CUDA graph of calls over
    enough weight copies to overflow L2, gpu_micro.graph_us): gemv_int4.TUNED's config against mma tiles
    (outputs per program x warps) x split-K counts x prefetch depths (--pf) x, for qkv and w13, the RMSNorm
    as a kernel before (timed with it) or inside (fuse_norm); one row's TUNED GEMV fuses its RMSNorm.
Prints tables last; writes bench/results/gpu_mma_probe.json.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save_device_result  # noqa: E402
from gpu_graph_sweep import MMA_TILES, row_counts  # noqa: E402
from gpu_micro import copies_for, graph_us, log  # noqa: E402

from qconv.convert.layout import pack_words  # noqa: E402
from qconv.convert.quant import dequantize  # noqa: E402
from qconv.runtime.kernels.gemv_int4 import GemvConfig, sum_buffers, w4_matmul  # noqa: E402
from qconv.runtime.kernels.norm import rms_norm  # noqa: E402

ROLES = {"qkv": (2048, 1536, "store"), "o": (1536, 1536, "residual"), "w13": (17920, 1536, "silu"),
         "w2": (1536, 8960, "residual")}
NORMED = ("qkv", "w13")  # their input is RMSNorm(residual): fused in the one-row GEMV, a kernel before the mma


def mma(block_n: int, split: int, warps: int, pf: int = 1, fuse_norm: bool = False) -> GemvConfig:
    return GemvConfig(block_n, split, warps, dot=True, mma=True, pf=pf, fuse_norm=fuse_norm)


def weights(N: int, K: int, seed: int, copies: int = 1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randint(0, 16, (N, K), device="cuda", generator=g)
    s = (torch.rand(N, K // 128, device="cuda", generator=g) * 0.02 + 0.001).half()
    z = torch.randint(0, 16, (N, K // 128), device="cuda", generator=g)
    words = pack_words(q, 128)
    return words, s, z.to(torch.uint8), q, [words.clone() for _ in range(copies - 1)]


def check(M: int, N: int, K: int, epi: str, cfg: GemvConfig, dt: torch.dtype, bias: bool, seed: int) -> float:
    """Relative error of w4_matmul (cfg) against x @ dequantized(W)^T in fp32, with the epilogue applied; a
    fuse_norm config takes an fp32 residual (values up to ~400) and its RMSNorm, rounded as the dense model rounds."""
    words, s, z, q, _ = weights(N, K, seed)
    W = dequantize(q, s.float(), z.float())
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.randn(M, K, device="cuda", generator=g).to(dt)
    norm = {}
    if epi == "silu-x":  # w2 taking the SiLU-mul of w13's fp32 sums as it loads them, += into the residual
        gu = torch.randn(M, 2 * K, device="cuda", generator=g) * 3
        x = (F.silu(gu[:, 0::2].to(dt)) * gu[:, 1::2].to(dt))
        epi, norm = "residual", dict(prologue="silu", dtype=dt)
    if cfg.fuse_norm:
        res = torch.randn(M, K, device="cuda", generator=g) * torch.linspace(1, 400, K, device="cuda")
        nw = (torch.rand(K, device="cuda", generator=g) + 0.5).to(dt)
        x = (nw.float() * (res * torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt).float()).to(dt)
        norm = dict(prologue="rmsnorm", norm_weight=nw, eps=1e-6)
    b = torch.randn(N, device="cuda", generator=g).to(dt) if bias else None
    want = x.float() @ W.t() + (b.float() if bias else 0)
    if cfg.fuse_norm:
        x = res
    if norm.get("prologue") == "silu":
        x = gu
    sums = None
    if epi == "silu":
        gate, up = want[:, 0::2].to(dt), want[:, 1::2].to(dt)
        want = (F.silu(gate.float()).to(dt).float() * up.float())
        out = torch.full((M, N // 2), float("nan"), device="cuda", dtype=dt)
        if cfg.split_k > 1:
            sums = sum_buffers(M, N, "cuda")
    elif epi == "residual":
        r0 = torch.randn(M, N, device="cuda", generator=g)
        out, want = r0.clone(), want + r0
    else:
        out = torch.full((M, N), float("nan"), device="cuda", dtype=dt)
    for _ in range(2 if sums is not None else 1):  # twice under split-K SiLU: the buffers must come back zero
        if epi == "residual":
            out.copy_(r0)
        w4_matmul(x, words, s, z, 128, out, bias=b, epilogue=epi, config=cfg, sums=sums, **norm)
    torch.cuda.synchronize()
    if sums is not None:
        assert sums[0].abs().max().item() == 0 and sums[1].abs().max().item() == 0, "sums / counters left non-zero"
    return ((out.float() - want).norm() / want.norm()).item() if torch.isfinite(out).all() else float("nan")


CASES = [  # (M, N, K, epilogue, config, bias)
    (8, 17920, 1536, "silu", mma(128, 1, 4), False), (8, 17920, 1536, "silu", mma(128, 3, 4), False),
    (8, 1536, 8960, "residual", mma(64, 9, 4), False), (8, 1536, 1536, "residual", mma(64, 4, 4), False),
    (8, 2048, 1536, "store", mma(64, 1, 4), True), (8, 2048, 1536, "residual", mma(64, 4, 4), True),
    (1, 2048, 1536, "store", mma(32, 1, 2), True), (5, 1000, 640, "store", mma(64, 1, 2), True),
    (13, 1000, 640, "residual", mma(128, 2, 8), False), (16, 512, 1024, "silu", mma(256, 1, 8), False),
    (40, 600, 768, "silu", mma(64, 2, 1), False), (3, 96, 384, "store", mma(32, 1, 1), False),
    (8, 520, 896, "residual", mma(128, 3, 2), False),
    # weights 2 / 3 groups ahead (slices shorter than that reload their last group), and the fused RMSNorm
    (1, 1536, 8960, "residual", mma(64, 18, 4, pf=3), False), (8, 17920, 1536, "silu", mma(128, 3, 4, pf=2), False),
    (1, 520, 896, "residual", mma(32, 5, 2, pf=3), False), (1, 17920, 1536, "silu", mma(64, 1, 4, 3, True), False),
    (1, 2048, 1536, "store", mma(64, 1, 2, 2, True), True), (6, 1000, 640, "silu", mma(64, 2, 2, 3, True), False),
    (12, 600, 768, "residual", mma(128, 1, 8, 1, True), True),
    # the SiLU-mul of w13's sums inside w2 (one row: made once, broadcast over the mma's 8 columns)
    (1, 1536, 8960, "silu-x", mma(64, 35, 2), False), (1, 520, 896, "silu-x", mma(32, 5, 2, pf=3), False),
    (8, 1536, 8960, "silu-x", mma(128, 18, 4), False), (13, 600, 768, "silu-x", mma(128, 2, 8), False),
]


def correctness() -> list[dict]:
    out = []
    for i, (M, N, K, epi, cfg, bias) in enumerate(CASES):
        for dt in (torch.float16, torch.bfloat16):
            try:
                err = check(M, N, K, epi, cfg, dt, bias, seed=10 + i)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                err = f"{type(e).__name__}: {str(e)[:160]}"
            ok = isinstance(err, float) and err < (3e-3 if dt == torch.float16 else 1.5e-2)
            out.append({"M": M, "N": N, "K": K, "epilogue": epi, "config": asdict(cfg), "bias": bias,
                        "dtype": str(dt), "rel_err": err, "pass": ok})
            log(f"  {M}x{N}x{K} {epi}{' +bias' if bias else ''} bn {cfg.block_n} split {cfg.split_k} warps "
                f"{cfg.num_warps} pf {cfg.pf}{' norm' if cfg.fuse_norm else ''} {str(dt)[6:]}: "
                f"{err if isinstance(err, str) else f'{err:.2e}'} "
                f"{'ok' if ok else 'FAIL'}")
    return out


def epilogue(role: str, M: int, split: int = 1) -> str:
    """The role's epilogue in a decode step of M rows: qkv under split-K (as several rows' qkv always is) adds
    split-K sums that the attention reads (GpuLinear.accumulates)."""
    return "residual" if role == "qkv" and (M > 1 or split > 1) else ROLES[role][2]


def time_role(role: str, M: int, cfg: GemvConfig | None) -> float:
    """µs per call of the role at M rows (cfg None: TUNED / default_config), with its RMSNorm kernel first
    where the config does not fuse it."""
    N, K, _ = ROLES[role]
    epi = epilogue(role, M, cfg.split_k if cfg is not None else 1)
    nbytes = N * K // 2 + N * (K // 128) * 3
    copies = copies_for(nbytes)
    words, s, z, _, more = weights(N, K, 7, copies)
    ws = [words] + more
    g = torch.Generator(device="cuda").manual_seed(3)
    normed = role in NORMED
    res = torch.randn(M, K, device="cuda", generator=g)
    nw = torch.rand(K, device="cuda", generator=g).half() + 0.5
    x = res.half()
    h = torch.empty_like(x)
    out = torch.zeros(M, N // 2 if epi == "silu" else N, device="cuda",
                      dtype=torch.float32 if epi == "residual" else torch.float16)
    sums = sum_buffers(M, N, "cuda") if epi == "silu" else None
    fused_norm = normed and ((M == 1 and (cfg is None or not cfg.dot)) or (cfg is not None and cfg.fuse_norm))

    def call(i):
        if fused_norm:  # the one-row GEMV: RMSNorm of the fp32 residual inside
            w4_matmul(res, ws[i], s, z, 128, out, prologue="rmsnorm", norm_weight=nw, eps=1e-6, epilogue=epi,
                      config=cfg, sums=sums)
            return
        inp = x
        if normed:
            inp = rms_norm(res, nw, 1e-6, h)
        w4_matmul(inp, ws[i], s, z, 128, out, epilogue=epi, config=cfg, sums=sums)
    return graph_us(call, copies)


def timing(quick: bool, row_counts: list[int], pfs: list[int]) -> dict:
    splits = {"qkv": (1, 2, 4), "o": (1, 2, 4, 8), "w13": (1, 2, 3), "w2": (3, 6, 9, 18)}
    splits1 = {"qkv": (1, 2, 3), "o": (2, 4, 6, 12), "w13": (1, 2, 3, 4), "w2": (9, 18, 35)}  # one row: more
    out = {}
    for M in row_counts:
        for role in ROLES:
            key = f"{role} M={M}"
            rows = out.setdefault(key, {})
            try:
                rows["TUNED"] = time_role(role, M, None)
            except Exception as e:  # noqa: BLE001
                rows["TUNED"] = f"{type(e).__name__}: {str(e)[:100]}"
            norms = (False, True) if role in NORMED else (False,)
            for bn, w in MMA_TILES[:4] if quick else MMA_TILES:
                for sp in (splits1 if M == 1 else splits)[role]:
                    for pf in pfs:
                        for fn in norms:
                            c = mma(bn, sp, w, pf, fn)
                            name = f"mma bn{bn} w{w} split{sp} pf{pf}{' norm' if fn else ''}"
                            try:
                                rows[name] = time_role(role, M, c)
                            except Exception as e:  # noqa: BLE001
                                rows[name] = f"{type(e).__name__}: {str(e)[:100]}"
            best = min((v, k) for k, v in rows.items() if isinstance(v, float))
            log(f"  {key}: TUNED {rows['TUNED'] if isinstance(rows['TUNED'], str) else round(rows['TUNED'], 2)} µs; "
                f"best {best[1]} {best[0]:.2f} µs")
    return out


def depths(text: str) -> list[int]:
    """--pf: a comma list of 1, 2, 3."""
    pfs = row_counts(text)
    if max(pfs) > 3:
        raise argparse.ArgumentTypeError(f"{text!r}: the weights load 1 to 3 groups ahead, e.g. 1,3")
    return pfs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--quick", action="store_true", help="fewer tiles in the timing sweep")
    ap.add_argument("--rows", default=[8, 1], type=row_counts, help="row counts of the timing sweep (comma list)")
    ap.add_argument("--pf", default=[1, 3], type=depths, help="prefetch depths to time (groups ahead, 1-3; comma list)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = {"command": "python3 bench/gpu_mma_probe.py " + " ".join(sys.argv[1:])}
    log("[1] correctness")
    res["correctness"] = correctness()
    save_device_result("gpu_mma_probe", res)
    if not args.skip_timing:
        log("[2] timing, each role alone (µs per call)")
        res["timing_us"] = timing(args.quick, args.rows, args.pf)
        save_device_result("gpu_mma_probe", res)
    res["wall_s"] = time.perf_counter() - t0
    save_device_result("gpu_mma_probe", res)
    fails = [c for c in res["correctness"] if not c["pass"]]
    log(f"\ncorrectness: {len(res['correctness']) - len(fails)}/{len(res['correctness'])} pass")
    for c in fails:
        log(f"  FAIL {c['M']}x{c['N']}x{c['K']} {c['epilogue']} {c['config']['block_n']}/{c['config']['split_k']}/"
            f"{c['config']['num_warps']} {c['dtype']}: {c['rel_err']}")
    for key, rows in res.get("timing_us", {}).items():
        ranked = sorted((v, k) for k, v in rows.items() if isinstance(v, float))
        tuned = rows.get("TUNED")
        log(f"| {key} | TUNED {tuned if isinstance(tuned, str) else round(tuned, 2)} | "
            + " | ".join(f"{k} {v:.2f}" for v, k in ranked[:4]) + " |")
    log(f"({res['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
