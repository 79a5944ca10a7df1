"""The GPU path's Triton kernels against plain PyTorch, on small random inputs.

Without CUDA they run on CPU tensors in Triton's interpreter (conftest sets TRITON_INTERPRET=1). The
interpreter emulates bf16 by truncation and its bf16 tl.dot is wrong, so bf16 is checked loosely there
and bf16 matmuls only on CUDA.
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: the GPU path's kernels are not tested")

from qconv.convert.layout import interleave_pairs, pack_words  # noqa: E402
from qconv.convert.quant import (dequantize, kv_dequantize, kv_quantize, kv_token_dequantize,  # noqa: E402
                                 kv_token_quantize, pack_int4_pairs, unpack_int4_pairs)
from qconv.runtime.cuda.kernels.attention import decode_attention  # noqa: E402
from qconv.runtime.cuda.kernels.attention_fused import counters, decode_attention_fused  # noqa: E402
from qconv.runtime.cuda.kernels.gemm_int8 import Int8Config, w8_matmul  # noqa: E402
from qconv.runtime.cuda.kernels.greedy import greedy_feed  # noqa: E402
from qconv.runtime.cuda.kernels.greedy import scratch as greedy_scratch  # noqa: E402
from qconv.runtime.cuda.kernels.w4_matmul import GemvConfig, w4_dequantize, w4_matmul  # noqa: E402
from qconv.runtime.cuda.kernels.norm import rms_norm, silu_mul  # noqa: E402
from qconv.runtime.cuda.kernels.rope_cache import rope_cache_write  # noqa: E402
from qconv.runtime.cpu.model import rms_norm as ref_rms_norm  # noqa: E402
from qconv.runtime.rope import apply_rotary  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def gen(seed):
    return torch.Generator().manual_seed(seed)


def int4_weight(N, K, g, seed):
    """Random codes and qparams -> (packed words, fp16 scales, uint8 zeros, reference W [N, K] float32)."""
    q = torch.randint(0, 16, (N, K), generator=gen(seed))
    s = (torch.rand(N, K // g, generator=gen(seed + 1)) * 0.02 + 0.001).half()
    z = torch.randint(0, 16, (N, K // g), generator=gen(seed + 2))
    return (pack_words(q, g).to(DEV), s.to(DEV), z.to(torch.uint8).to(DEV), dequantize(q, s.float(), z.float()))


def expected_and_output(y, epi, dt, seed):
    """The wanted result of an int4 GEMM whose plain product (fp32) is y, under epilogue ``epi``, and the output
    the kernel writes into: poisoned with NaN, or (residual) a random fp32 residual that y is added to. silu:
    rows 2n, 2n + 1 of y are gate n and up n."""
    M, N = y.shape
    if epi == "silu":
        return (F.silu(y[:, 0::2].to(dt)) * y[:, 1::2].to(dt)).float(), torch.full((M, N // 2), float("nan"),
                                                                                   dtype=dt, device=DEV)
    if epi == "residual":
        r0 = torch.randn(M, N, generator=gen(seed))
        return y + r0, r0.clone().to(DEV)
    return y, torch.full((M, N), float("nan"), dtype=dt, device=DEV)


# (M, N, K, group, prologue, epilogue, bias, config)
GEMV_CASES = {
    "gemv-bias": (1, 48, 256, 64, "none", "store", True, GemvConfig(32, v=2)),
    "gemv-rmsnorm-v4-2warps": (1, 40, 384, 128, "rmsnorm", "store", False, GemvConfig(16, 1, 2, v=4)),
    "gemv-residual-splitk-g32": (1, 40, 384, 32, "none", "residual", False, GemvConfig(16, 4, v=2)),
    "gemv-rmsnorm-residual-9-groups": (1, 40, 576, 64, "rmsnorm", "residual", False, GemvConfig(8, 1, v=2)),
    "gemv-residual-uneven-split": (1, 40, 576, 64, "none", "residual", False, GemvConfig(8, 2, 1, v=4)),
    "gemv-rmsnorm-silu": (1, 48, 256, 64, "rmsnorm", "silu", False, GemvConfig(8, v=2)),
    "gemv-rmsnorm-silu-2-rows-v1": (1, 48, 256, 64, "rmsnorm", "silu", False, GemvConfig(2, v=1)),
    "gemv-residual-splitk-1-row": (1, 40, 384, 32, "none", "residual", False, GemvConfig(1, 4, v=1)),
    # a split count that is not a power of two (as the config tables' w2 entries): 10 groups in slices of 2, the last 4 empty
    "gemv-residual-split-9": (1, 40, 640, 64, "none", "residual", False, GemvConfig(4, 9, v=4)),
    "gemm-rmsnorm-bias": (3, 40, 384, 128, "rmsnorm", "store", True, GemvConfig(16)),
    "gemm-split-with-empty-slice": (5, 40, 576, 64, "none", "residual", False, GemvConfig(16, 4)),
    "gemm-rmsnorm-silu": (4, 48, 256, 64, "rmsnorm", "silu", False, GemvConfig(16)),
    "gemm-17-rows": (17, 24, 256, 64, "none", "store", False, GemvConfig(16)),
    # 64- and 128-row tiles: Hopper's wgmma in the tensor-core kernel
    "wide-rmsnorm-silu": (8, 256, 512, 128, "rmsnorm", "silu", False, GemvConfig(128, num_warps=8)),
    "wide-1-row-residual-split": (1, 192, 384, 128, "none", "residual", False, GemvConfig(64, 2)),
    "wide-2-rows-bias": (2, 160, 256, 64, "none", "store", True, GemvConfig(64)),
    "wide-2-groups-per-step-x-in-order": (1, 128, 640, 64, "rmsnorm", "store", False, GemvConfig(64, gpi=2, xvec=True)),
    "wide-2-groups-per-step-split": (3, 128, 640, 64, "none", "residual", False, GemvConfig(64, 2, gpi=2)),
    # weights loaded 2 / 3 steps ahead: slices of 2 and 3 groups (the loads past a slice's end are masked)
    "wide-prefetch-2-split": (8, 192, 640, 64, "none", "residual", False, GemvConfig(64, 4, pf=2, xvec=True)),
    "wide-prefetch-3-rmsnorm-silu": (5, 256, 384, 64, "rmsnorm", "silu", False, GemvConfig(128, num_warps=8, pf=3)),
    # CUDA cores, several rows per program (one step's codes serve them all); a last program with padding rows
    "gemv-4-rows-per-program-silu": (8, 48, 256, 64, "none", "silu", False, GemvConfig(8, v=2, rows=4)),
    "gemv-rows-rmsnorm-bias-padded": (5, 40, 384, 128, "rmsnorm", "store", True, GemvConfig(8, 1, 2, v=4, rows=4)),
    "gemv-rows-residual-split": (3, 40, 576, 64, "none", "residual", False, GemvConfig(4, 3, 1, v=4, rows=2)),
}


@pytest.mark.parametrize("kernel", ["cuda-cores", "tl.dot", "tensor-cores"])
@pytest.mark.parametrize("case", GEMV_CASES)
def test_int4_matmul_matches_dequantized_weights(case, kernel):
    M, N, K, g, pro, epi, bias, cfg = GEMV_CASES[case]
    if M > 1 and kernel == "cuda-cores" and cfg.rows == 1:
        pytest.skip("several rows take a tl.dot kernel, or the GEMV with rows per program")
    cfg = dataclasses.replace(cfg, dot=kernel != "cuda-cores", tc=kernel == "tensor-cores")
    dt = torch.float16
    words, s, z, W = int4_weight(N, K, g, seed=len(case))
    b = torch.randn(N, generator=gen(3)).to(dt) if bias else None
    nw = None
    if pro == "rmsnorm":  # the fp32 residual, normalized as runtime/cpu/model.py does
        x = torch.randn(M, K, generator=gen(4))
        nw = (torch.rand(K, generator=gen(5)) + 0.5).to(dt)
        h = ref_rms_norm(x.to(dt), nw, 1e-6).float()
    else:
        x = torch.randn(M, K, generator=gen(4)).to(dt)
        h = x.float()
    want, out = expected_and_output(h @ W.t() + (b.float() if bias else 0), epi, dt, seed=6)
    w4_matmul(x.to(DEV), words, s, z, g, out, bias=None if b is None else b.to(DEV), prologue=pro,
              norm_weight=None if nw is None else nw.to(DEV), eps=1e-6, epilogue=epi, config=cfg)
    assert rel(out.cpu(), want) < 3e-3


@pytest.mark.parametrize("cfg", [GemvConfig(8, 2, 1, v=4, dot=False), GemvConfig(32, 2), GemvConfig(64, 3, tc=True, pf=2),
                                 GemvConfig(64, 3, 2, dot=True, mma=True, pf=3)], ids=["gemv", "gemm", "tc", "mma"])
def test_group_major_words_give_the_same_products(cfg):
    """The runtime's group-major words [K/G, N, G/8] (convert/layout.group_major) and pack_words' rows [N, K/8]:
    every kernel reads them through its row and group strides, to the same sums; dequantize too."""
    from qconv.convert.layout import group_major, rows_major, word_strides
    words, s, z, W = int4_weight(72, 768, 128, seed=95)
    gm = group_major(words, 128)
    assert gm.shape == (6, 72, 16) and torch.equal(rows_major(gm), words)
    assert word_strides(gm, 128) == (72, 768, 16, 72 * 16) and word_strides(words, 128) == (72, 768, 96, 16)
    x = torch.randn(3 if cfg.dot else 1, 768, generator=gen(96)).half().to(DEV)
    outs = []
    for w in (words, gm):
        out = torch.zeros(x.shape[0], 72, device=DEV)
        w4_matmul(x, w, s, z, 128, out, epilogue="residual", config=cfg)
        outs.append(out.cpu())
    assert rel(outs[1], outs[0]) < 1e-6 and rel(outs[0], x.float().cpu() @ W.t()) < 3e-3
    out = torch.empty(72, 768, dtype=torch.float16, device=DEV)
    assert torch.equal(w4_dequantize(gm, s, z, 128, out).cpu(), W.half())


@pytest.mark.parametrize("split", [2, 4])  # 6 groups: slices of 3; of 2, the fourth empty
def test_split_k_silu_epilogue_merges_in_the_last_slice(split):
    """w13 under split-K (tensor-core kernel): each K-slice adds into fp32 sums, the last slice of a tile to
    finish applies SiLU-mul; the sums and counters are left zero, so one pair of buffers serves call after call."""
    from qconv.runtime.cuda.kernels.w4_matmul import sum_buffers
    M, N, K, g, dt = 5, 256, 384, 64, torch.float16
    words, s, z, W = int4_weight(N, K, g, seed=61)
    nw = (torch.rand(K, generator=gen(62)) + 0.5).to(dt)
    cfg = GemvConfig(128, split, 8, dot=True, tc=True, xvec=True)
    sums = sum_buffers(M, N, DEV)
    for seed in (63, 64):
        x = torch.randn(M, K, generator=gen(seed))
        y = ref_rms_norm(x.to(dt), nw, 1e-6).float() @ W.t()
        want = (F.silu(y[:, 0::2].to(dt)) * y[:, 1::2].to(dt)).float()
        out = torch.full((M, N // 2), float("nan"), dtype=dt, device=DEV)
        w4_matmul(x.to(DEV), words, s, z, g, out, prologue="rmsnorm", norm_weight=nw.to(DEV), eps=1e-6,
                  epilogue="silu", config=cfg, sums=sums)
        assert rel(out.cpu(), want) < 3e-3
        assert (sums[0] == 0).all() and (sums[1] == 0).all()
    out2 = torch.full((M, N // 2), float("nan"), dtype=dt, device=DEV)  # no buffers given: the call makes its own
    w4_matmul(x.to(DEV), words, s, z, g, out2, prologue="rmsnorm", norm_weight=nw.to(DEV), eps=1e-6,
              epilogue="silu", config=cfg)
    assert rel(out2.cpu(), out.cpu()) < 1e-3  # (atomic adds on a GPU: any order)


# kernels/mma_int4.py (mma.sync from registers, Gluon) on CUDA; Triton's interpreter cannot run Gluon, so on the
# CPU w4_matmul takes the tensor-core kernel for these configs (w4_matmul.mma_fallback). (M, N, K, epilogue,
# bias, config): 8 and 16 rows per program, several row blocks, a last tile past N, K-slices of unequal size
MMA_CASES = {
    "8-rows-silu": (8, 256, 512, "silu", False, GemvConfig(128, 1, 4, dot=True, mma=True)),
    "8-rows-residual-split-3-of-7-groups": (8, 200, 896, "residual", False, GemvConfig(64, 3, 2, dot=True, mma=True)),
    "1-row-store-bias": (1, 96, 384, "store", True, GemvConfig(32, 1, 2, dot=True, mma=True)),
    "13-rows-store-bias": (13, 80, 256, "store", True, GemvConfig(64, 1, 1, dot=True, mma=True)),
    "40-rows-residual": (40, 128, 384, "residual", False, GemvConfig(256, 2, 8, dot=True, mma=True)),
    "5-rows-residual-bias-split": (5, 160, 512, "residual", True, GemvConfig(32, 4, 1, dot=True, mma=True)),
    # the weights 2 and 3 groups ahead: slices of 4 groups, of 1 (the prefetch reloads its last group)
    "1-row-residual-prefetch-3": (1, 192, 1024, "residual", False, GemvConfig(64, 2, 4, dot=True, mma=True, pf=3)),
    "8-rows-silu-prefetch-2-split": (8, 256, 384, "silu", False, GemvConfig(64, 3, 2, dot=True, mma=True, pf=2)),
}
# the RMSNorm of the fp32 residual inside the kernel (fuse_norm): one row as decode's qkv (store + bias) and w13
# (SiLU-mul, split-K) take it, and several rows
MMA_NORM_CASES = {
    "1-row-store-bias": (1, 96, 384, "store", True, GemvConfig(32, 1, 2, dot=True, mma=True, pf=2, fuse_norm=True)),
    "1-row-silu-split": (1, 256, 512, "silu", False, GemvConfig(64, 2, 4, dot=True, mma=True, pf=3, fuse_norm=True)),
    "11-rows-residual": (11, 128, 640, "residual", False, GemvConfig(128, 1, 8, dot=True, mma=True, fuse_norm=True)),
}


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", MMA_CASES)
def test_mma_int4_matmul_matches_dequantized_weights(case, dt):
    if dt == torch.bfloat16 and DEV == "cpu":
        pytest.skip("bf16 tl.dot needs CUDA (the interpreter's is wrong)")
    M, N, K, epi, bias, cfg = MMA_CASES[case]
    words, s, z, W = int4_weight(N, K, 128, seed=len(case) + 40)
    x = torch.randn(M, K, generator=gen(41)).to(dt)
    b = torch.randn(N, generator=gen(42)).to(dt) if bias else None
    want, out = expected_and_output(x.float() @ W.t() + (b.float() if bias else 0), epi, dt, seed=43)
    w4_matmul(x.to(DEV), words, s, z, 128, out, bias=None if b is None else b.to(DEV), epilogue=epi, config=cfg)
    assert rel(out.cpu(), want) < (3e-3 if dt == torch.float16 else 1.5e-2)


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", MMA_NORM_CASES)
def test_mma_int4_fused_rmsnorm_rounds_as_the_dense_model(case, dt):
    """h = RMSNorm(residual) inside the kernel (its rstd from the whole row first), on a residual whose channels
    reach ~300: the output of the dense model's norm, rounded as it rounds, times the weights."""
    if dt == torch.bfloat16 and DEV == "cpu":
        pytest.skip("bf16 tl.dot needs CUDA (the interpreter's is wrong)")
    M, N, K, epi, bias, cfg = MMA_NORM_CASES[case]
    words, s, z, W = int4_weight(N, K, 128, seed=len(case) + 80)
    x = torch.randn(M, K, generator=gen(81)) * torch.linspace(1, 300, K)
    nw = (torch.rand(K, generator=gen(82)) + 0.5).to(dt)
    b = torch.randn(N, generator=gen(83)).to(dt) if bias else None
    h = ref_rms_norm(x.to(dt), nw, 1e-6).float()
    want, out = expected_and_output(h @ W.t() + (b.float() if bias else 0), epi, dt, seed=84)
    w4_matmul(x.to(DEV), words, s, z, 128, out, bias=None if b is None else b.to(DEV), prologue="rmsnorm",
              norm_weight=nw.to(DEV), eps=1e-6, epilogue=epi, config=cfg)
    assert rel(out.cpu(), want) < (3e-3 if dt == torch.float16 else 1.5e-2)


@pytest.mark.parametrize("split", [1, 3])
def test_mma_int4_split_silu_leaves_its_buffers_zero(split):
    """w13 through the mma config at 8 rows, one K-slice and three (the last slice of a tile applies SiLU-mul):
    call after call on the same sum buffers, which come back zero."""
    from qconv.runtime.cuda.kernels.w4_matmul import sum_buffers
    M, N, K, dt = 8, 384, 768, torch.float16
    words, s, z, W = int4_weight(N, K, 128, seed=71)
    cfg = GemvConfig(128, split, 4, dot=True, mma=True)
    sums = sum_buffers(M, N, DEV)
    for seed in (72, 73):
        x = torch.randn(M, K, generator=gen(seed)).to(dt)
        y = x.float() @ W.t()
        want = (F.silu(y[:, 0::2].to(dt)) * y[:, 1::2].to(dt)).float()
        out = torch.full((M, N // 2), float("nan"), dtype=dt, device=DEV)
        w4_matmul(x.to(DEV), words, s, z, 128, out, epilogue="silu", config=cfg, sums=sums)
        assert rel(out.cpu(), want) < 3e-3
        assert (sums[0] == 0).all() and (sums[1] == 0).all()


SILU_X_CASES = {  # w2 whose input is w13's fp32 sums: (rows, N, K, config)
    "1-row-mma-split": (1, 160, 768, GemvConfig(64, 3, 2, dot=True, mma=True)),
    "1-row-mma-pf3": (1, 96, 384, GemvConfig(32, 3, 2, dot=True, mma=True, pf=3)),
    "5-rows-mma": (5, 128, 512, GemvConfig(128, 2, 8, dot=True, mma=True)),
    "12-rows-mma": (12, 64, 256, GemvConfig(64, 1, 4, dot=True, mma=True)),
    "1-row-gemv": (1, 64, 256, GemvConfig(8, 2, 1, dot=False)),
}


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", SILU_X_CASES)
def test_silu_prologue_takes_w13_sums(case, dt):
    """prologue="silu": h = silu(gate) * up of w13's fp32 sums (gate n, up n at columns 2n, 2n + 1), rounded as
    the dense model rounds F.silu(g) * u, then += h W^T into the residual. The mma kernel makes h as it loads its
    input (one row: once, broadcast over its 8 columns); other kernels take a silu_mul kernel first."""
    if dt == torch.bfloat16 and DEV == "cpu":
        pytest.skip("bf16 tl.dot needs CUDA (the interpreter's is wrong)")
    M, N, K, cfg = SILU_X_CASES[case]
    words, s, z, W = int4_weight(N, K, 128 if cfg.dot else 64, seed=len(case) + 90)
    sums = torch.randn(M, 2 * K, generator=gen(91)) * 3
    h = (F.silu(sums[:, 0::2].to(dt)) * sums[:, 1::2].to(dt)).float()
    want, out = expected_and_output(h @ W.t(), "residual", dt, seed=92)
    w4_matmul(sums.to(DEV), words, s, z, 128 if cfg.dot else 64, out, prologue="silu", epilogue="residual",
              config=cfg, dtype=dt)
    assert rel(out.cpu(), want) < (3e-3 if dt == torch.float16 else 1.5e-2)
    with pytest.raises(AssertionError, match="activation dtype"):
        w4_matmul(sums.to(DEV), words, s, z, 128 if cfg.dot else 64, out, prologue="silu", epilogue="residual")


def test_mma_config_falls_back_where_the_kernel_cannot_run():
    """group 64 (the mma kernel takes 128), or Triton's interpreter: the tensor-core kernel with the same outputs
    per program; a malformed mma tile is refused when the config is made."""
    from qconv.runtime.cuda.kernels.w4_matmul import mma_fallback
    cfg = GemvConfig(32, 2, 1, dot=True, mma=True)
    fb = mma_fallback(cfg)
    assert (fb.mma, fb.tc, fb.split_k) == (False, True, 2) and fb.block_n >= 64
    words, s, z, W = int4_weight(64, 256, 64, seed=75)
    x = torch.randn(3, 256, generator=gen(76)).half()
    out = torch.zeros(3, 64, dtype=torch.float32, device=DEV)
    w4_matmul(x.to(DEV), words, s, z, 64, out, epilogue="residual", config=cfg)
    assert rel(out.cpu(), x.float() @ W.t()) < 3e-3
    with pytest.raises(AssertionError, match="block_n"):
        GemvConfig(48, 1, 2, dot=True, mma=True)


def test_interleaved_pairs_feed_the_silu_epilogue():
    """interleave_pairs (gate | up -> pairs) then the silu epilogue = silu(x Wg^T) * (x Wu^T)."""
    from qconv.convert.layout import QuantLinear
    N, K, g = 32, 128, 64
    q = torch.randint(0, 16, (2 * N, K), generator=gen(30))
    s = (torch.rand(2 * N, K // g, generator=gen(31)) * 0.02 + 0.001).half()
    z = torch.randint(0, 16, (2 * N, K // g), generator=gen(32)).float()
    W = dequantize(q, s.float(), z)
    x = torch.randn(1, K, generator=gen(33)).half()
    y = (x.float() @ W.t()).half()
    want = F.silu(y[:, :N]) * y[:, N:]
    p = interleave_pairs(QuantLinear(q, s, z))
    out = torch.empty(1, N, dtype=torch.float16, device=DEV)
    w4_matmul(x.to(DEV), pack_words(p.codes, g).to(DEV), p.scale.to(DEV), p.zero.to(torch.uint8).to(DEV), g, out,
              epilogue="silu", config=GemvConfig(8, v=2, dot=False))
    assert rel(out.cpu(), want) < 3e-3


@pytest.mark.skipif(DEV == "cpu", reason="bf16 tl.dot needs CUDA (the interpreter's is wrong)")
@pytest.mark.parametrize("M", [1, 8])
def test_int4_matmul_bf16(M):
    words, s, z, W = int4_weight(64, 512, 128, seed=7)
    x = torch.randn(M, 512, generator=gen(8)).bfloat16()
    out = torch.empty(M, 64, dtype=torch.bfloat16, device=DEV)
    w4_matmul(x.to(DEV), words, s, z, 128, out)
    assert rel(out.cpu(), x.float() @ W.t()) < 1e-2


def test_int4_dequantize():
    words, s, z, W = int4_weight(40, 384, 64, seed=9)
    out = torch.full((40, 384), float("nan"), dtype=torch.float16, device=DEV)
    w4_dequantize(words, s, z, 64, out)
    assert torch.equal(out.cpu(), W.half())


def test_rms_norm_and_silu_mul():
    x = torch.randn(3, 100, generator=gen(10))
    w = (torch.rand(100, generator=gen(11)) + 0.5).half()
    out = rms_norm(x.to(DEV), w.to(DEV), 1e-5, torch.empty(3, 100, dtype=torch.float16, device=DEV))
    assert rel(out.cpu(), ref_rms_norm(x.half(), w, 1e-5)) < 2e-3
    # the same launch zeroes the first rows of a buffer (w13's sums), in several programs' blocks
    from qconv.runtime.cuda.kernels.norm import ZERO_BLOCK
    zero = torch.ones(4, ZERO_BLOCK + 7, device=DEV)
    again = rms_norm(x.to(DEV), w.to(DEV), 1e-5, torch.empty(3, 100, dtype=torch.float16, device=DEV), zero=zero)
    assert torch.equal(again, out) and (zero[:3] == 0).all() and (zero[3] == 1).all()
    gu = torch.randn(3, 2 * 1500, generator=gen(12)).half()
    out = silu_mul(gu.to(DEV), torch.empty(3, 1500, dtype=torch.float16, device=DEV))
    assert rel(out.cpu(), F.silu(gu[:, :1500]) * gu[:, 1500:]) < 2e-3
    out = silu_mul(gu.to(DEV), torch.empty(3, 1500, dtype=torch.float16, device=DEV), pairs=True)
    assert rel(out.cpu(), F.silu(gu[:, 0::2]) * gu[:, 1::2]) < 2e-3


def kv_params(hkv, seed):
    """[4, Hkv] = k_scale, k_zp, v_scale, v_zp."""
    g = gen(seed)
    return torch.stack([torch.rand(hkv, generator=g) * 0.02 + 0.01, torch.randn(hkv, generator=g) * 0.1,
                        torch.rand(hkv, generator=g) * 0.02 + 0.01, torch.randn(hkv, generator=g) * 0.1]).float()


def kv_cache(mode, rows, hkv, S, d, g, dt=torch.float16, seed=20):
    """A random cache of ``mode`` -> (k, v, kv_params or None, token_params or None, k and v as float32 values).
    False: fp16 values; True: static int8 codes with per-head params; 8, 4: online codes (runtime/kv_cache.py's
    layout, int4 two per byte) with their (scale, zp) per (token, head) [rows, Hkv, S, 2] float16."""
    shape = (rows, hkv, S, d)
    if mode is False:
        kc, vc = torch.randn(shape, generator=g).to(dt), torch.randn(shape, generator=g).to(dt)
        return kc, vc, None, None, kc.float(), vc.float()
    if mode is True:
        kvp = kv_params(hkv, seed)
        kc = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
        vc = torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)
        return (kc, vc, kvp, None, kv_dequantize(kc, kvp[0][None, :, None, None], kvp[1][None, :, None, None],
                                                 torch.float32),
                kv_dequantize(vc, kvp[2][None, :, None, None], kvp[3][None, :, None, None], torch.float32))
    codes = [torch.randint(0, 256, (*shape[:3], d * mode // 8), generator=g, dtype=torch.uint8) for _ in range(2)]
    params = [torch.stack([torch.rand(shape[:3], generator=g) * 0.02 + 0.005,
                           torch.randn(shape[:3], generator=g) * 0.3], -1).half() for _ in range(2)]
    ref = [kv_token_dequantize(unpack_int4_pairs(c) if mode == 4 else c, p[..., 0].float(), p[..., 1].float(),
                               torch.float32) for c, p in zip(codes, params)]
    return codes[0], codes[1], None, tuple(params), ref[0], ref[1]


def rotary(S, D):
    ang = torch.arange(S)[:, None].float() / (10000 ** (torch.arange(0, D, 2).float() / D))[None]
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos(), emb.sin()


def written_tokens(out, qkv, pos, slot, written):
    """(token, position, cache row) of each token that wrote the cache, marked in ``written`` [rows, S]; a padding
    token's row of qkv is left as it was."""
    for t in range(len(pos)):
        p, r = int(pos[t]), int(slot[t])
        if p < 0:
            assert torch.equal(out[t], qkv[t])
            continue
        written[r, p] = True
        yield t, p, r


@pytest.mark.parametrize("quant,qk_norm", [(False, False), (True, False), (True, True)])
def test_rope_and_cache_write(quant, qk_norm):
    T, HQ, HKV, D, rows, S = 5, 4, 2, 32, 3, 40
    dt = torch.float16
    qkv = torch.randn(T, (HQ + 2 * HKV) * D, generator=gen(13)).to(dt)
    pos = torch.randperm(S, generator=gen(14))[:T]
    pos[1] = -1  # padding: writes nothing
    slot = torch.randint(0, rows, (T,), generator=gen(15))
    cos, sin = rotary(S, D)
    store = torch.int8 if quant else dt
    kc, vc = torch.full((rows, HKV, S, D), 3, dtype=store), torch.full((rows, HKV, S, D), 3, dtype=store)
    kvp = kv_params(HKV, 16) if quant else None
    qn = (torch.rand(D, generator=gen(17)) + 0.5).to(dt) if qk_norm else None
    kn = (torch.rand(D, generator=gen(18)) + 0.5).to(dt) if qk_norm else None
    out, kc_d, vc_d = qkv.clone().to(DEV), kc.clone().to(DEV), vc.clone().to(DEV)
    rope_cache_write(out, pos.to(DEV), slot.to(DEV), cos.to(DEV), sin.to(DEV), kc_d, vc_d, HQ, HKV,
                     None if kvp is None else kvp.to(DEV), None if qn is None else qn.to(DEV),
                     None if kn is None else kn.to(DEV), 1e-6, write_back=True)
    out, kc_d, vc_d = out.cpu(), kc_d.cpu(), vc_d.cpu()
    written = torch.zeros(rows, S, dtype=torch.bool)
    for t, p, r in written_tokens(out, qkv, pos, slot, written):
        x = qkv[t].view(HQ + 2 * HKV, D)
        q, k, v = x[:HQ], x[HQ:HQ + HKV], x[HQ + HKV:]
        if qk_norm:
            q, k = ref_rms_norm(q, qn, 1e-6), ref_rms_norm(k, kn, 1e-6)
        c, s = cos[p][None, None].to(dt), sin[p][None, None].to(dt)  # [1, 1, D]
        q, k = apply_rotary(q[None], c, s)[0], apply_rotary(k[None], c, s)[0]
        got = out[t].view(HQ + 2 * HKV, D)
        assert rel(got[:HQ], q) < 2e-3
        if quant:  # int8 codes within one step of torch's (rotary rounding), written back as q * scale + zp
            assert (kc_d[r, :, p].int() - kv_quantize(k, kvp[0][:, None], kvp[1][:, None]).int()).abs().max() <= 1
            assert torch.equal(vc_d[r, :, p], kv_quantize(v, kvp[2][:, None], kvp[3][:, None]))
            assert torch.equal(got[HQ:HQ + HKV], kv_dequantize(kc_d[r, :, p], kvp[0][:, None], kvp[1][:, None], dt))
        else:
            assert rel(kc_d[r, :, p], k) < 2e-3 and torch.equal(vc_d[r, :, p], v)
            assert torch.equal(got[HQ:HQ + HKV], kc_d[r, :, p])
    untouched = ~written[:, None, :, None].expand_as(kc_d)  # [rows, 1, S, 1] -> [rows, Hkv, S, D]
    assert (kc_d[untouched] == 3).all() and (vc_d[untouched] == 3).all()


def test_rope_reads_and_zeroes_split_k_sums():
    """With acc, q|k|v come from the fp32 sums (rounded to the activation dtype) and acc is left zero."""
    T, HQ, HKV, D, S = 3, 4, 2, 32, 16
    acc = torch.randn(T, (HQ + 2 * HKV) * D, generator=gen(21))
    pos, slot = torch.tensor([3, -1, 9]), torch.tensor([0, 1, 1])
    cos, sin = rotary(S, D)
    kvp = kv_params(HKV, 22)
    outs = []
    for use_acc in (False, True):
        qkv = acc.half() if not use_acc else torch.full_like(acc, float("nan"), dtype=torch.float16)
        kc, vc = torch.zeros(2, HKV, S, D, dtype=torch.int8), torch.zeros(2, HKV, S, D, dtype=torch.int8)
        a = acc.clone().to(DEV)
        qkv, kc, vc = qkv.to(DEV), kc.to(DEV), vc.to(DEV)
        rope_cache_write(qkv, pos.to(DEV), slot.to(DEV), cos.to(DEV), sin.to(DEV), kc, vc, HQ, HKV, kvp.to(DEV),
                         acc=a if use_acc else None)
        outs.append((qkv[[0, 2], :HQ * D].cpu(), kc.cpu(), vc.cpu()))
        if use_acc:
            assert (a == 0).all()  # padding row included
    for x, y in zip(*outs):
        assert torch.equal(x, y)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_online_cache_write_stores_kv_token_quantize_codes_and_params(bits, qk_norm):
    """rope_cache_write into an online cache: each written (token, kv head) holds exactly kv_token_quantize's codes
    (int4 packed as pack_int4_pairs) and fp16 (scale, zp) of the head vector after rotary, the rotary the kernel
    writes into an fp16 cache; write_back leaves x' = c * scale + zp in qkv; nothing else changes."""
    T, HQ, HKV, D, rows, S, dt = 5, 4, 2, 32, 3, 24, torch.float16
    qkv = (torch.randn(T, (HQ + 2 * HKV) * D, generator=gen(61)) * 2 + 0.5).to(dt)
    pos = torch.randperm(S, generator=gen(62))[:T]
    pos[1] = -1  # padding: writes nothing
    slot = torch.tensor([0, 1, 2, 2, 0])
    cos, sin = rotary(S, D)
    qn, kn = ((torch.rand(D, generator=gen(63 + i)) + 0.5).to(dt) for i in range(2)) if qk_norm else (None, None)
    to = (lambda *ts: [None if t is None else t.to(DEV) for t in ts])
    args = to(pos, slot, cos, sin)
    ref = qkv.clone().to(DEV)  # the rotated K and V as the kernel writes them into an fp16 cache
    kf, vf = (torch.zeros(rows, HKV, S, D, dtype=dt, device=DEV) for _ in range(2))
    rope_cache_write(ref, *args, kf, vf, HQ, HKV, None, *to(qn, kn), 1e-6)
    width = D * bits // 8
    kc, vc = (torch.full((rows, HKV, S, width), 3, dtype=torch.uint8, device=DEV) for _ in range(2))
    kp, vp = (torch.full((rows, HKV, S, 2), 3, dtype=torch.float16, device=DEV) for _ in range(2))
    out = qkv.clone().to(DEV)
    rope_cache_write(out, *args, kc, vc, HQ, HKV, None, *to(qn, kn), 1e-6, write_back=True, token_params=(kp, vp))
    out, ref, kf, vf, kc, vc, kp, vp = (t.cpu() for t in (out, ref, kf, vf, kc, vc, kp, vp))
    written = torch.zeros(rows, S, dtype=torch.bool)
    for t, p, r in written_tokens(out, qkv, pos, slot, written):
        back = out[t].view(HQ + 2 * HKV, D)
        assert torch.equal(back[:HQ], ref[t].view(HQ + 2 * HKV, D)[:HQ])  # q: rotary only
        for j, (codes, params, x) in enumerate(((kc, kp, kf), (vc, vp, vf))):
            want, scale, zp = kv_token_quantize(x[r, :, p], bits)  # [Hkv, D] codes, [Hkv] params
            assert torch.equal(codes[r, :, p], pack_int4_pairs(want) if bits == 4 else want)
            assert torch.equal(params[r, :, p].float(), torch.stack([scale, zp], -1))
            head = back[HQ + j * HKV:HQ + (j + 1) * HKV]  # within an FMA's rounding of the dequantized value
            assert torch.allclose(head, kv_token_dequantize(want, scale, zp, dt), rtol=1e-3, atol=1e-5)
    untouched = ~written[:, None, :, None]  # [rows, 1, S, 1]
    for buf in (kc, vc, kp, vp):
        assert (buf.float()[untouched.expand_as(buf)] == 3).all()


@pytest.mark.parametrize("quant,hq,hkv,d,lengths,splits", [
    (False, 6, 2, 32, [40], 4),
    (True, 4, 2, 16, [1, 96, 0], 8),  # one row of one key, one full row, one padding row
    (True, 8, 1, 64, [17, 80], 1),
    (True, 6, 2, 32, [40, 20], 2),  # splits of 32 keys: one wide tile (wide=True) or two
    (False, 6, 2, 32, [40, 20], 2),
    (8, 4, 2, 16, [1, 40, 0], 4),  # online int8 and int4: dots over the codes, per-key params folded
    (4, 6, 2, 32, [33, 20], 2),
    (4, 8, 1, 64, [17], 1),
])
def test_decode_attention_matches_sdpa(quant, hq, hkv, d, lengths, splits):
    B, S, dt = len(lengths), 96, torch.float16
    g = gen(19)
    kc, vc, kvp, tp, kref, vref = kv_cache(quant, B + 1, hkv, S, d, g)
    q = torch.randn(B, hq * d, generator=g).to(dt)
    pos = torch.tensor(lengths) - 1
    slot = torch.arange(B, 0, -1)  # rows B..1 of the cache
    out = torch.full((B, hq * d), float("nan"), dtype=dt, device=DEV)
    decode_attention(q.to(DEV), pos.to(DEV), slot.to(DEV), kc.to(DEV), vc.to(DEV), hq, out,
                     None if kvp is None else kvp.to(DEV), splits=splits, block_n=16, wide=splits == 2,
                     token_params=None if tp is None else tuple(t.to(DEV) for t in tp))
    out = out.cpu()
    for b, L in enumerate(lengths):
        if L == 0:
            assert (out[b] == 0).all()
            continue
        k = kref[slot[b], :, :L].repeat_interleave(hq // hkv, 0)  # [Hq, L, D]
        v = vref[slot[b], :, :L].repeat_interleave(hq // hkv, 0)
        want = F.scaled_dot_product_attention(q[b].float().view(hq, 1, d), k, v, scale=1 / math.sqrt(d))
        assert rel(out[b], want.reshape(-1)) < 3e-3


@pytest.mark.parametrize("quant,qk_norm,hq,hkv,d,positions,splits", [
    (True, False, 6, 2, 32, [39, 5], 4),         # GQA 3, two rows, keys over several splits
    (True, True, 4, 2, 16, [0, 70, -1], 8),      # a first token, a long row, a padding row; q/k norm
    (False, False, 8, 1, 64, [17], 1),           # one split: no merge
    (True, True, 4, 2, 16, [0, 70, -1], 1),      # one split of several tiles per row: it writes the output and
                                                 # zeroes the sums itself (no combine kernel runs)
    (True, False, 2, 1, 16, [150], 16),          # 10 splits hold keys: the merge reads two chunks of 8
    (True, False, 6, 2, 32, [39, 20], 2),        # splits of 32 keys: one wide tile (wide=True) or two
    (False, False, 4, 2, 32, [39], 2),
    (8, True, 4, 2, 16, [0, 37, -1], 4),         # online int8 and int4: each new head's codes and (scale, zp)
    (4, False, 6, 2, 32, [20, 5], 2),
])
def test_fused_decode_attention_equals_rope_then_attention(quant, qk_norm, hq, hkv, d, positions, splits):
    """decode_attention_fused = rope_cache_write then decode_attention, on the same cache: the same codes
    (and online params) written, the same output (up to the order of fp32 sums)."""
    B, S, dt = len(positions), max(96, max(positions) + 1), torch.float16
    g = gen(31)
    qkv = torch.randn(B, (hq + 2 * hkv) * d, generator=g).to(dt)
    kc, vc, kvp, tp, _, _ = kv_cache(quant, B + 1, hkv, S, d, g, seed=32)
    tp = tp or ()
    qn = (torch.rand(d, generator=g) + 0.5).to(dt) if qk_norm else None
    kn = (torch.rand(d, generator=g) + 0.5).to(dt) if qk_norm else None
    pos, slot = torch.tensor(positions), torch.arange(B, 0, -1)
    cos, sin = rotary(S, d)
    to = (lambda t: None if t is None else t.to(DEV))
    args = [to(t) for t in (pos, slot, cos, sin)]
    # reference: the two-kernel path
    q_ref, kc_ref, vc_ref = qkv.clone().to(DEV), kc.clone().to(DEV), vc.clone().to(DEV)
    tp_ref = tuple(t.clone().to(DEV) for t in tp) or None
    rope_cache_write(q_ref, args[0], args[1], args[2], args[3], kc_ref, vc_ref, hq, hkv, to(kvp), to(qn), to(kn), 1e-6,
                     token_params=tp_ref)
    want = torch.full((B, hq * d), float("nan"), dtype=dt, device=DEV)
    decode_attention(q_ref, args[0], args[1], kc_ref, vc_ref, hq, want, to(kvp), splits=splits, block_n=16,
                     token_params=tp_ref)
    # fused, twice (the split counters must be back at zero after a launch)
    want = want.cpu()
    # the splits merged in the same kernel, or by the combine kernel; or q|k|v read from a split-K GEMM's fp32
    # sums (which the combine kernel leaves zeroed for the next layer); or the same 16-key splits read as 32-key
    # tiles (split_round); splits of 16 < keys <= 32 read as one 32-key tile (wide); int8 tiles converted after
    # shared memory (int8_in_registers=False); merged in the same kernel from split-K sums (the merging split, or
    # the only one, zeroes them)
    for merge, sums, bn, rnd, wide, regs in ((True, False, 16, None, False, True), (False, False, 16, None, False, True),
                                             (False, True, 16, None, False, True), (False, True, 32, 16, False, True),
                                             (True, False, 16, None, True, True), (False, True, 16, None, True, False),
                                             (True, True, 16, None, False, False)):
        kc_f, vc_f = kc.clone().to(DEV), vc.clone().to(DEV)
        tp_f = tuple(t.clone().to(DEV) for t in tp) or None
        count = counters(B, hkv, DEV)
        for _ in range(2):
            got = torch.full((B, hq * d), float("nan"), dtype=dt, device=DEV)
            src = qkv.float().to(DEV) if sums else qkv.to(DEV)
            decode_attention_fused(src, *args, kc_f, vc_f, hq, got, to(kvp), to(qn), to(kn), 1e-6, splits=splits,
                                   count=count, block_n=bn, merge=merge, sums=sums, split_round=rnd, wide=wide,
                                   int8_in_registers=regs, token_params=tp_f)
            assert (count == 0).all() and (not sums or (src == 0).all())
        assert torch.equal(kc_f.cpu(), kc_ref.cpu()) and torch.equal(vc_f.cpu(), vc_ref.cpu())
        for a, b in zip(tp_f or (), tp_ref or ()):
            assert torch.equal(a.cpu(), b.cpu())
        got = got.cpu()
        for b, p in enumerate(positions):
            if p < 0:
                assert (got[b] == 0).all()
            else:
                assert rel(got[b], want[b]) < 2e-3


@pytest.mark.parametrize("M,N,K", [(1, 40, 256), (3, 100, 576), (17, 24, 128)])
def test_int8_matmul_matches_dequantized_weights(M, N, K):
    """gemm_int8.w8_matmul (the int8 LM head) against x @ (q * s)^T; odd N and M, K not a multiple of 128."""
    g = gen(41)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    s = torch.rand(N, generator=g) * 0.01 + 1e-4
    x = torch.randn(M, K, generator=g).half()
    out = torch.full((M, N), float("nan"), dtype=torch.float16, device=DEV)
    w8_matmul(x.to(DEV), q.to(DEV), s.to(DEV), out, Int8Config(32, 64, 4, 2))
    want = x.float() @ (q.float() * s[:, None]).t()
    assert rel(out.cpu(), want) < 2e-3


def test_greedy_feed_takes_the_first_argmax_and_moves_rows_on():
    """kernels/greedy.py: argmax per row (ties: the first index, as torch.argmax), written as the next token,
    position + 1 except for padding rows, and into the ring; twice (the counters reset)."""
    V = 1000
    logits = torch.randn(3, V, generator=gen(51)).half()
    logits[0, 700] = logits[0, 5] = 9.0  # a tie: index 5 wins
    idx = torch.tensor([[1, 2, 3, 0], [10, -1, 4, 0], [0, 1, 2, 0]])
    want = logits.float().argmax(-1)
    work = greedy_scratch(4, DEV)
    ring, tok = torch.zeros(4, dtype=torch.int64, device=DEV), torch.zeros(4, dtype=torch.int64, device=DEV)
    idx_d = idx.to(DEV)
    for step in range(2):
        greedy_feed(logits.to(DEV), idx_d, tok, ring, work)
        assert int(tok[0]) == 5 and torch.equal(tok[:3].cpu(), want) and torch.equal(ring[:3].cpu(), want)
        assert idx_d[0, :3].tolist() == want.tolist() and idx_d[1, :3].tolist() == [11 + step, -1, 5 + step]
        assert (work[2] == 0).all()
