"""EXPERIMENT (not used by the runtime; bench/GPU_NOTES.md has its numbers): int4 GEMV on the tensor cores.

Status 2026-11-22 (H100): correct for one input row; several rows (M > 1) come out wrong by a per-row
offset (bench/experiments/w4_mma_diag.py), not yet found; one row is latency-bound (w13 11.3 µs).

int4 weights times a few rows on the tensor cores (decode), and the whole weight dequantized (prefill).

Device layout ("mma words", built once at load by convert/layout.pack_mma from the workspace's codes):
  words   int32 [N/16, K/64, 32, 4]: 16-row tile rt, 64-column chunk kc, lane T = 4g + t, k-tile j;
          nibble m = 4 hi + 2 a1 + a0 (bits 4m .. 4m+3) holds the code of
              row 16 rt + g + 8 a0,   column 64 kc + 16 t + 4 j + 2 a1 + hi
  scales  fp16 [N, K/G],  zeros uint8 [N, K/G]  (as in the workspace);  w = (q - z) * s
Why this order: (w >> 4a) & 0x000F000F | MAGIC is register a of the mma.m16n8k16 A fragment (a0 = a & 1:
row half, a1 = a >> 1: k half) as two fp16 (bf16) values MAGIC + q -- one LOP3, no conversion
instruction; and the B fragment of k-tile j of lane (n = T // 4, t) is the x pairs 8t + 2j and 8t + 2j + 1
of the chunk, so a lane's 8 pairs (16 consecutive columns of input row n) arrive in two 16-byte loads,
already in the registers the mma wants. The accumulator holds
    C = sum_k (MAGIC + q) x = MAGIC sum x + sum q x       (fp32)
and C0 = MAGIC sum x comes from the same mma on zero codes, so per row and group
    y = s * (C - C0 - z * C0 / MAGIC) = s * sum (q - z) x.
The mma's 8 columns n are input rows: one program serves up to 8 rows (grid z: blocks of 8 rows).

_w4_mma_kernel  one warp; R row tiles (16 R rows) over one K-slice of whole groups (G = 64 or 128):
                split-K is a run-time argument. Epilogues: store (+ bias); add into the fp32 residual
                (atomic with split-K); SiLU-mul: the w13 rows come tile-interleaved (rows 0-7 of a tile
                are gate 8m .. 8m+7, rows 8-15 up 8m .. 8m+7, convert/layout.interleave_gate_up), so
                one lane holds gate and up of the same output and batch row: h = silu(gate) * up,
                rounded where runtime/model.py rounds.
_w4_dequant_kernel  w [N, K] = (q - z) * s in column order (prefill: then cuBLAS).
With PDL (Hopper), a kernel lets the next one launch at once, loads its first chunk of weights, and
only then waits for the previous kernel (griddepcontrol): weight streaming overlaps the launch gap.
Under Triton's interpreter (tests without CUDA) the mma is emulated with tensor ops (_mma_emu).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qconv.convert.layout import QuantLinear
from qconv.runtime.kernels import INTERPRET
from qconv.runtime.kernels.gemv_int4 import _act

EPILOGUES = {"store": 0, "residual": 1, "silu": 2}
def _chunk_asm(bf16: bool) -> str:
    """PTX: four k-tiles of one lane; $0-$3 the C fragment (tied to inputs $16-$19), $4-$7 the words,
    $8-$11 / $12-$15 the B registers (b0, b1) of k-tiles 0, 1 / 2, 3."""
    magic = "0x43004300" if bf16 else "0x64006400"
    ty = "bf16" if bf16 else "f16"
    lines = ["{", ".reg .b32 a0, a1, a2, a3, s;"]
    for j in range(4):
        w = f"${4 + j}"
        lines.append(f"lop3.b32 a0, {w}, 0x000F000F, {magic}, 0xEA;")
        for a in (1, 2, 3):
            lines += [f"shr.u32 s, {w}, {4 * a};", f"lop3.b32 a{a}, s, 0x000F000F, {magic}, 0xEA;"]
        b = 8 + 4 * (j // 2) + 2 * (j % 2)
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{ty}.{ty}.f32 {{$0, $1, $2, $3}}, "
                     f"{{a0, a1, a2, a3}}, {{${b}, ${b + 1}}}, {{$0, $1, $2, $3}};")
    lines.append("}")
    return "\n".join(lines)


_CHUNK_F16 = tl.constexpr(_chunk_asm(False))
_CHUNK_BF16 = tl.constexpr(_chunk_asm(True))


@triton.jit
def _halves(b, BF16: tl.constexpr):
    """int32 holding two fp16 / bf16 -> (low, high) in fp32 (emulation only)."""
    lo = (b & 0xFFFF).to(tl.int16)
    hi = ((b >> 16) & 0xFFFF).to(tl.int16)
    if BF16:
        return lo.to(tl.bfloat16, bitcast=True).to(tl.float32), hi.to(tl.bfloat16, bitcast=True).to(tl.float32)
    else:
        return lo.to(tl.float16, bitcast=True).to(tl.float32), hi.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _mma_emu(c, w, bA, bB, BF16: tl.constexpr):
    """What the PTX of _mma_chunk computes for one warp, with tensor ops (Triton's interpreter)."""
    MAGIC: tl.constexpr = 128.0 if BF16 else 1024.0
    m = tl.arange(0, 8)
    q = (tl.reshape(w, [8, 4, 4])[:, :, :, None] >> (4 * m)[None, None, None, :]) & 0xF  # [g, t, j, m]
    q = tl.reshape(q, [8, 4, 4, 2, 2, 2])                                              # g, t, j, hi, a1, a0
    A = tl.reshape(tl.permute(q, [2, 5, 0, 4, 1, 3]), [4, 16, 16]).to(tl.float32) + MAGIC  # [j, row, k]
    b = tl.reshape(tl.join(bA, bB), [8, 4, 2, 2, 2])                                   # n, t, jlo, breg, jhi
    lo, hi = _halves(b, BF16)
    x = tl.join(lo, hi)                                                                # n, t, jlo, breg, jhi, h
    B = tl.reshape(tl.permute(x, [4, 2, 3, 1, 5, 0]), [4, 16, 8])                      # [j, k, n]
    C = tl.sum(tl.sum(A[:, :, :, None] * B[:, None, :, :], axis=2), axis=0)            # [row, n]
    C = tl.reshape(tl.permute(tl.reshape(C, [2, 8, 4, 2]), [1, 2, 0, 3]), [1, 128])     # lane-major fragment
    return c + C


@triton.jit
def _mma_chunk(c, w, bA, bB, BF16: tl.constexpr, ASM: tl.constexpr):
    """c [1, 128] fp32 C fragments (element 4T + i = register c_i of lane T) += A(w) B over the 4 k-tiles
    of one chunk; w [1, 128] the words (element 4T + j: k-tile j), bA / bB the B registers."""
    if ASM:
        return tl.inline_asm_elementwise(_CHUNK_BF16 if BF16 else _CHUNK_F16,
                                         "=f,=f,=f,=f,r,r,r,r,r,r,r,r,r,r,r,r,0,1,2,3", [w, bA, bB, c],
                                         dtype=tl.float32, is_pure=True, pack=4)
    else:
        return _mma_emu(c, w, bA, bB, BF16)


@triton.jit
def _pair_rows(lo, hi):
    """[1, 32] values of rows g and g + 8 of each lane -> [1, 128] in C-fragment order (lo, lo, hi, hi)."""
    return tl.reshape(tl.join(tl.join(lo, hi), tl.join(lo, hi)), [1, 128])  # join stacks on a new last dim


@triton.jit
def _scale_group(acc, c, c0, s_g, s_g8, z_g, z_g8, MAGIC: tl.constexpr):
    """acc += s * (C - C0 - z C0 / MAGIC) for one tile and group; s / z of rows g and g + 8: [1, 32] each."""
    s = _pair_rows(s_g, s_g8).to(tl.float32)
    z = _pair_rows(z_g, z_g8).to(tl.float32)
    return acc + s * (c - c0 - z * (c0 * (1.0 / MAGIC)))


@triton.jit
def _epilogue(acc, rt, m0, y_ptr, stride_ym, b_ptr, M, pid_k, EPI: tl.constexpr, ATOMIC: tl.constexpr,
              HAS_BIAS: tl.constexpr, BF16: tl.constexpr):
    """Tile rt's C fragment [1, 128] -> y."""
    e = tl.arange(0, 128)[None, :]
    T = e // 4
    n = m0 + 2 * (T % 4) + (e % 2)                                  # input row of element e
    row = rt * 16 + T // 4 + 8 * ((e % 4) // 2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + row, mask=pid_k == 0, other=0.0).to(tl.float32)
    if EPI == 0:
        tl.store(y_ptr + n * stride_ym + row, acc.to(y_ptr.dtype.element_ty), mask=n < M)
    elif EPI == 1:
        if ATOMIC:
            tl.atomic_add(y_ptr + n * stride_ym + row, acc, mask=n < M)
        else:
            y = y_ptr + n * stride_ym + row
            tl.store(y, tl.load(y, mask=n < M, other=0.0) + acc, mask=n < M)
    else:  # rows g (gate) and g + 8 (up) of the tile are one output: h = silu(gate) * up
        gu = tl.permute(tl.reshape(acc, [1, 32, 2, 2]), [0, 1, 3, 2])  # [.., n % 2, gate | up]
        gate, up = tl.split(gu)                                          # [1, 32, 2]
        gate = _act(gate, BF16)
        h = _act(_act(gate * tl.sigmoid(gate), BF16) * _act(up, BF16), BF16)
        L = tl.arange(0, 32)[None, :, None]
        nn = m0 + 2 * (L % 4) + tl.arange(0, 2)[None, None, :]
        tl.store(y_ptr + nn * stride_ym + rt * 8 + L // 4, h.to(y_ptr.dtype.element_ty), mask=nn < M)


@triton.jit
def _load_words(w0p, kc, KC, ok, CPG: tl.constexpr, R: tl.constexpr):
    """Words of the group starting at chunk kc: tiles 0 / 1, chunks 0 / 1 (CPG <= 2)."""
    w00 = tl.load(w0p + kc * 128, mask=ok, other=0)
    w10 = w00
    w01 = w00
    w11 = w00
    if R > 1:
        w10 = tl.load(w0p + (KC + kc) * 128, mask=ok, other=0)
    if CPG > 1:
        w01 = tl.load(w0p + (kc + 1) * 128, mask=ok, other=0)
        if R > 1:
            w11 = tl.load(w0p + (KC + kc + 1) * 128, mask=ok, other=0)
    return w00, w01, w10, w11


@triton.jit
def _load_sz(s0p, z0p, stride_s, grp, ok, R: tl.constexpr):
    """Scales and zeros of group grp for rows g / g + 8 of tiles 0 / 1: [1, 32] each."""
    s0 = tl.load(s0p + grp, mask=ok, other=0.0)
    s8 = tl.load(s0p + 8 * stride_s + grp, mask=ok, other=0.0)
    z0 = tl.load(z0p + grp, mask=ok, other=0)
    z8 = tl.load(z0p + 8 * stride_s + grp, mask=ok, other=0)
    t0, t8, u0, u8 = s0, s8, z0, z8
    if R > 1:
        t0 = tl.load(s0p + 16 * stride_s + grp, mask=ok, other=0.0)
        t8 = tl.load(s0p + 24 * stride_s + grp, mask=ok, other=0.0)
        u0 = tl.load(z0p + 16 * stride_s + grp, mask=ok, other=0)
        u8 = tl.load(z0p + 24 * stride_s + grp, mask=ok, other=0)
    return s0, s8, z0, z8, t0, t8, u0, u8


@triton.jit
def _load_x(x32, b_ok, kc, ok, CPG: tl.constexpr):
    """B registers of the group starting at chunk kc: (bA, bB) of chunks 0 / 1."""
    bA0 = tl.load(x32 + kc * 32, mask=b_ok & ok, other=0)
    bB0 = tl.load(x32 + kc * 32 + 4, mask=b_ok & ok, other=0)
    bA1 = bA0
    bB1 = bB0
    if CPG > 1:
        bA1 = tl.load(x32 + (kc + 1) * 32, mask=b_ok & ok, other=0)
        bB1 = tl.load(x32 + (kc + 1) * 32 + 4, mask=b_ok & ok, other=0)
    return bA0, bB0, bA1, bB1


@triton.jit
def _w4_mma_kernel(x_ptr, stride_xm, w_ptr, s_ptr, z_ptr, stride_s, b_ptr, y_ptr, stride_ym, M, K, SPLIT_K,
                   G: tl.constexpr, EPI: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BF16: tl.constexpr, R: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
    """One warp: R (1 or 2) row tiles over the groups of one K-slice. Each step computes one group from
    registers while the next group's words and B registers load (the loads do not wait on the mma)."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    MAGIC: tl.constexpr = 128.0 if BF16 else 1024.0
    CPG: tl.constexpr = G // 64                          # chunks per group (1 or 2)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    ng = K // G
    per = tl.cdiv(ng, SPLIT_K)
    g_lo = pid_k * per
    g_hi = tl.minimum(g_lo + per, ng)
    KC = K // 64
    e = tl.arange(0, 128)[None, :]                       # element 4T + j of a lane's 4 words / registers
    lane = tl.arange(0, 32)[None, :]
    rt0 = pid_n * R
    m0 = pid_m * 8
    w0p = w_ptr + rt0 * KC * 128 + e                     # tile rt0's words of chunk 0
    s0p = s_ptr + (rt0 * 16 + lane // 4) * stride_s      # rows g of tile rt0
    z0p = z_ptr + (rt0 * 16 + lane // 4) * stride_s
    n_b = m0 + e // 16                                   # B fragment: lane T reads input row T // 4
    b_ok = n_b < M
    x32 = x_ptr.to(tl.pointer_type(tl.int32)) + n_b * (stride_xm // 2) + 8 * ((e // 4) % 4) + e % 4
    zero_w = tl.zeros([1, 128], tl.int32)
    # the first group's weights do not depend on the previous kernel: start loading them before waiting
    w00, w01, w10, w11 = _load_words(w0p, g_lo * CPG, KC, g_lo < g_hi, CPG, R)
    s0, s8, z0, z8, t0, t8, u0, u8 = _load_sz(s0p, z0p, stride_s, g_lo, g_lo < g_hi, R)
    if PDL:
        tl.extra.cuda.gdc_wait()
    bA0, bB0, bA1, bB1 = _load_x(x32, b_ok, g_lo * CPG, g_lo < g_hi, CPG)
    a0 = tl.zeros([1, 128], tl.float32)
    a1 = a0
    for grp in range(g_lo, g_hi):
        nw00, nw01, nw10, nw11 = _load_words(w0p, (grp + 1) * CPG, KC, grp + 1 < g_hi, CPG, R)
        nA0, nB0, nA1, nB1 = _load_x(x32, b_ok, (grp + 1) * CPG, grp + 1 < g_hi, CPG)
        ns0, ns8, nz0, nz8, nt0, nt8, nu0, nu8 = _load_sz(s0p, z0p, stride_s, grp + 1, grp + 1 < g_hi, R)
        c0 = _mma_chunk(tl.zeros([1, 128], tl.float32), zero_w, bA0, bB0, BF16, ASM)   # MAGIC * sum x
        k0 = _mma_chunk(tl.zeros([1, 128], tl.float32), w00, bA0, bB0, BF16, ASM)
        k1 = c0
        if R > 1:
            k1 = _mma_chunk(tl.zeros([1, 128], tl.float32), w10, bA0, bB0, BF16, ASM)
        if CPG > 1:
            c0 = _mma_chunk(c0, zero_w, bA1, bB1, BF16, ASM)
            k0 = _mma_chunk(k0, w01, bA1, bB1, BF16, ASM)
            if R > 1:
                k1 = _mma_chunk(k1, w11, bA1, bB1, BF16, ASM)
        a0 = _scale_group(a0, k0, c0, s0, s8, z0, z8, MAGIC)
        if R > 1:
            a1 = _scale_group(a1, k1, c0, t0, t8, u0, u8, MAGIC)
        w00, w01, w10, w11, bA0, bB0, bA1, bB1 = nw00, nw01, nw10, nw11, nA0, nB0, nA1, nB1
        s0, s8, z0, z8, t0, t8, u0, u8 = ns0, ns8, nz0, nz8, nt0, nt8, nu0, nu8
    _epilogue(a0, rt0, m0, y_ptr, stride_ym, b_ptr, M, pid_k, EPI, ATOMIC, HAS_BIAS, BF16)
    if R > 1:
        _epilogue(a1, rt0 + 1, m0, y_ptr, stride_ym, b_ptr, M, pid_k, EPI, ATOMIC, HAS_BIAS, BF16)


@triton.jit
def _w4_dequant_kernel(w_ptr, s_ptr, z_ptr, stride_s, out_ptr, stride_o, K, G: tl.constexpr):
    """Program (tile rt, chunk kc): 16 rows x 64 columns of w = (q - z) * s."""
    rt, kc = tl.program_id(0), tl.program_id(1)
    e = tl.arange(0, 128)
    T = e // 4
    g, t, j = T // 4, T % 4, e % 4
    words = tl.load(w_ptr + (rt * (K // 64) + kc) * 128 + e)
    grp = (kc * 64) // G
    for m in tl.static_range(8):
        row = rt * 16 + g + 8 * (m % 2)
        col = kc * 64 + 16 * t + 4 * j + 2 * ((m // 2) % 2) + m // 4
        q = ((words >> (4 * m)) & 0xF).to(tl.float32)
        s = tl.load(s_ptr + row * stride_s + grp).to(tl.float32)
        z = tl.load(z_ptr + row * stride_s + grp).to(tl.float32)
        tl.store(out_ptr + row * stride_o + col, ((q - z) * s).to(out_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class GemvConfig:
    tiles: int = 1        # R: 16-row tiles per program (1 or 2)
    split_k: int = 1      # K-slices (only with the residual epilogue: atomic adds)


# Per-shape choices from bench/gpu_runtime.py (kernels step) on the H100: {(N, K, epilogue): config}.
TUNED: dict[tuple[int, int, str], GemvConfig] = {}


def default_config(N: int, K: int, group: int, epilogue: str, sms: int = 132) -> GemvConfig:
    """Untuned shapes: the largest R (1, 2, 4) dividing N/16 that still gives >= 2 programs per SM, else the
    smallest; split-K (residual only) until there are about 4 programs per SM, keeping >= 2 groups each."""
    tuned = TUNED.get((N, K, epilogue))
    if tuned is not None:
        return tuned
    tiles = N // 16
    r = 2 if tiles % 2 == 0 and tiles // 2 >= 4 * sms else 1
    split = 1
    if epilogue == "residual":
        while (tiles // r) * split * 2 <= 4 * sms and (K // group) // (split * 2) >= 2:
            split *= 2
    return GemvConfig(r, split)


def check_mma_shape(N: int, K: int, group: int) -> bool:
    """Shapes the mma kernel takes: N a multiple of 16, K of 64, group 64 or 128 dividing K."""
    return N % 16 == 0 and K % 64 == 0 and group in (64, 128) and K % group == 0


def w4_matmul(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
              out: torch.Tensor, bias: torch.Tensor | None = None, epilogue: str = "store",
              config: GemvConfig | None = None, pdl: bool = False) -> torch.Tensor:
    """out = x W^T (+ bias); out += x W^T (fp32, ``epilogue="residual"``); or out = silu(gate) * up of the
    tile-interleaved w13 (``"silu"``: out [M, N/2]). x: [M, K] fp16 / bf16, any M (blocks of 8 rows)."""
    N, K = scales.shape[0], scales.shape[1] * group
    M = x.shape[0]
    epi = EPILOGUES[epilogue]
    assert words.dtype == torch.int32 and words.numel() == N * K // 8, "words: int32 [N/16, K/64, 32, 4] (pack_mma)"
    assert check_mma_shape(N, K, group), f"[{N}, {K}] group {group}: N % 16, K % 64, group 64 or 128"
    assert scales.stride() == zeros.stride() and scales.stride(-1) == 1 and zeros.dtype == torch.uint8
    assert x.dim() == 2 and x.shape[1] == K and x.stride(-1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0, \
        f"x {tuple(x.shape)}: rows of K={K} contiguous, 16-byte aligned"
    assert x.dtype in (torch.float16, torch.bfloat16), f"activations must be fp16 or bf16, got {x.dtype}"
    n_out = N // 2 if epi == 2 else N
    assert out.dim() == 2 and out.shape == (M, n_out) and out.stride(-1) == 1, f"out {tuple(out.shape)} for [{M}, {n_out}]"
    assert epi != 1 or out.dtype == torch.float32, "the residual is float32"
    assert bias is None or (epi != 2 and bias.shape == (N,) and bias.is_contiguous())
    cfg = config or default_config(N, K, group, epilogue)
    assert cfg.split_k == 1 or epi == 1, "split-K needs the residual epilogue (atomic adds)"
    assert (N // 16) % cfg.tiles == 0 and cfg.tiles in (1, 2), f"{cfg.tiles} tiles do not divide {N // 16}"
    grid = (N // 16 // cfg.tiles, cfg.split_k, triton.cdiv(M, 8))
    _w4_mma_kernel[grid](x, x.stride(0), words, scales, zeros, scales.stride(0), bias if bias is not None else scales,
                         out, out.stride(0), M, K, cfg.split_k, G=group, EPI=epi, ATOMIC=cfg.split_k > 1,
                         HAS_BIAS=bias is not None, BF16=x.dtype == torch.bfloat16, R=cfg.tiles, ASM=not INTERPRET,
                         PDL=pdl, num_warps=1, launch_pdl=pdl)
    return out


def w4_dequantize(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int,
                  out: torch.Tensor) -> torch.Tensor:
    """out [N, K] = (q - z) * s in out's dtype (prefill: then a dense matmul)."""
    N, K = scales.shape[0], scales.shape[1] * group
    assert check_mma_shape(N, K, group) and words.numel() == N * K // 8 and scales.stride() == zeros.stride()
    assert out.shape == (N, K) and out.stride(-1) == 1
    _w4_dequant_kernel[(N // 16, K // 64)](words, scales, zeros, scales.stride(0), out, out.stride(0), K, G=group,
                                           num_warps=1)
    return out


# ---- the device layout (was convert/layout.py in the experiment) ----
# The GPU runtime's device layout of int4 codes (runtime/kernels/gemv_int4.py says why): a 16-row tile
# rt and 64-column chunk kc make 128 int32 words [32 lanes T = 4g + t, 4 k-tiles j]; nibble m = 4 hi +
# 2 a1 + a0 holds row 16 rt + g + 8 a0, column 64 kc + 16 t + 4 j + 2 a1 + hi.
# Source view [rt, a0, g, kc, t, j, a1, hi] -> word order [rt, kc, g, t, j] with nibbles (hi, a1, a0).
_MMA_VIEW = (0, 3, 2, 4, 5, 7, 6, 1)


def pack_mma(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in 0..15 (N % 16 == 0, K % 64 == 0) -> int32 [N/16, K/64, 32, 4] (the GPU layout)."""
    N, K = codes.shape
    assert N % 16 == 0 and K % 64 == 0, f"the mma layout needs N % 16 == 0 and K % 64 == 0, got [{N}, {K}]"
    c = codes.to(torch.int32).reshape(N // 16, 2, 8, K // 64, 4, 4, 2, 2).permute(*_MMA_VIEW)
    c = c.reshape(N // 16, K // 64, 32, 4, 8)
    w = torch.zeros(c.shape[:-1], dtype=torch.int32, device=codes.device)
    for m in range(8):
        w |= c[..., m] << (4 * m)  # int32 wraps: nibble 7 lands in the sign bit, as the kernel expects
    return w


def unpack_mma(words: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of ``pack_mma``: int32 words -> int32 codes [N, K]."""
    shifts = 4 * torch.arange(8, device=words.device, dtype=torch.int32)
    c = (words.reshape(N // 16, K // 64, 32, 4, 1) >> shifts) & 0xF  # [rt, kc, T, j, m]
    c = c.reshape(N // 16, K // 64, 8, 4, 4, 2, 2, 2)                  # rt, kc, g, t, j, hi, a1, a0
    inverse = [_MMA_VIEW.index(i) for i in range(8)]
    return c.permute(*inverse).reshape(N, K)


def interleave_gate_up(w: torch.Tensor | QuantLinear) -> torch.Tensor | QuantLinear:
    """gate | up fused along out [2I, ...] -> 16-row tiles of (gate 8m .. 8m+7, up 8m .. 8m+7): the order the
    GPU kernel's SiLU-mul epilogue reads (one lane holds gate and up of one output). I % 8 == 0."""
    def perm(t: torch.Tensor) -> torch.Tensor:
        I = t.shape[0] // 2
        return torch.stack([t[:I].reshape(I // 8, 8, *t.shape[1:]), t[I:].reshape(I // 8, 8, *t.shape[1:])],
                           dim=1).reshape(t.shape)
    if isinstance(w, QuantLinear):
        return QuantLinear(perm(w.codes), perm(w.scale), perm(w.zero))
    return perm(w)


