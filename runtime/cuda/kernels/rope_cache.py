"""Rotary (+ per-head q/k RMSNorm) on the fused q|k|v rows, and the K/V write into the static cache.

One program per (token, head) of qkv [T, (Hq + 2 Hkv) * D]:
  q heads:  optional norm, rotary, written back in place
  k heads:  optional norm, rotary, then into k_cache[slot, h, pos, :]
  v heads:  into v_cache[slot, h, pos, :]
Rotary is neox style over the halves [a, b] of D:  [a, b] -> [a cos - b sin, b cos + a sin].
With int8 params (quant_policy 4) the cache holds q = clamp(round((x - zp) / scale), -128, 127) (round half
to even, as torch.round); ``write_back`` also stores the value the cache now means, x' = q * scale + zp,
into qkv, so that prefill attention sees exactly what later decode steps read. The online modes (kv_mode int8,
int4) quantize each k / v head vector after rotary with its own (scale, zp), stored beside its codes
(kv_codes.py), after the cache's transform where it has one (x - c) R, the first positions also kept in the
activation dtype (the sink); write_back stores x' likewise, back in x's space. A token with pos < 0 is padding:
nothing is written.
With ``acc`` (decode), q|k|v come from an fp32 buffer [T, ...] that a split-K GEMV accumulated (bias
included); the kernel, its only reader, zeroes it for the next layer (padding rows too) and writes q
into qkv.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .kv_codes import _put_transformed, _rint, online_bits, param_args, transform_args


@triton.jit
def _rope_cache_kernel(qkv_ptr, stride_t, acc_ptr, stride_at, pos_ptr, slot_ptr, cos_ptr, sin_ptr, qn_ptr, kn_ptr,
                       eps, kc_ptr, vc_ptr, stride_cb, stride_ch, stride_cs, kvp_ptr, kp_ptr, vp_ptr, stride_pb,
                       stride_ph, r_ptr, c_ptr, sk_ptr, sv_ptr, stride_sb, stride_sh, HQ: tl.constexpr,
                       HKV: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr, BITS: tl.constexpr, ROT: tl.constexpr,
                       CENTER: tl.constexpr, SINK: tl.constexpr,
                       QK_NORM: tl.constexpr, WRITE_BACK: tl.constexpr, FROM_ACC: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    t, h = tl.program_id(0), tl.program_id(1)
    HALF: tl.constexpr = D // 2
    dt = qkv_ptr.dtype.element_ty
    i = tl.arange(0, HALF)
    row = qkv_ptr + t * stride_t + h * D
    p = tl.load(pos_ptr + t)
    if FROM_ACC:  # take the split-K sums (in the activation dtype, as a stored qkv), leave zeros behind
        acc = acc_ptr + t * stride_at + h * D
        a = tl.load(acc + i).to(dt).to(tl.float32)
        b = tl.load(acc + HALF + i).to(dt).to(tl.float32)
        tl.store(acc + i, tl.zeros([HALF], tl.float32))
        tl.store(acc + HALF + i, tl.zeros([HALF], tl.float32))
    else:
        a = tl.load(row + i).to(tl.float32)
        b = tl.load(row + HALF + i).to(tl.float32)
    if p >= 0:
        if h < HQ + HKV:  # q or k
            if QK_NORM:  # weight * (x * rsqrt(mean(x^2) + eps)).to(dtype), over D
                is_q = h < HQ
                wa = tl.where(is_q, tl.load(qn_ptr + i).to(tl.float32), tl.load(kn_ptr + i).to(tl.float32))
                wb = tl.where(is_q, tl.load(qn_ptr + HALF + i).to(tl.float32),
                              tl.load(kn_ptr + HALF + i).to(tl.float32))
                r = 1.0 / tl.sqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / D + eps)
                a = (wa * (a * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
                b = (wb * (b * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            c = tl.load(cos_ptr + p * D + i)  # the tables repeat the half-dim angles: cos[:D/2] == cos[D/2:]
            s = tl.load(sin_ptr + p * D + i)
            a, b = (a * c - b * s).to(dt).to(tl.float32), (b * c + a * s).to(dt).to(tl.float32)
            if h < HQ:
                tl.store(row + i, a.to(dt))
                tl.store(row + HALF + i, b.to(dt))
        if h >= HQ:  # k or v: into the cache
            is_v = h >= HQ + HKV
            kvh = h - HQ - HKV * is_v.to(tl.int32)
            slot = tl.load(slot_ptr + t)
            off = slot * stride_cb + kvh * stride_ch + p * stride_cs
            if BITS:  # online: the head vector [D] = [a, b] (transformed) with its own (scale, zp)
                x = tl.reshape(tl.permute(tl.join(a, b), [1, 0]), [D])
                poff = slot * stride_pb + kvh * stride_ph + p * 2
                soff = slot * stride_sb + kvh * stride_sh + p * D
                center = tl.zeros([D], tl.float32)
                if CENTER:  # K's center; V has none
                    center = tl.load(c_ptr + kvh * D + tl.arange(0, D)) * (1.0 - is_v.to(tl.float32))
                if is_v:
                    x = _put_transformed(x, center, vc_ptr + off, vp_ptr + poff, sv_ptr + soff, r_ptr, p, dt, D,
                                         BITS, ROT, SINK)
                else:
                    x = _put_transformed(x, center, kc_ptr + off, kp_ptr + poff, sk_ptr + soff, r_ptr, p, dt, D,
                                         BITS, ROT, SINK)
                if WRITE_BACK:  # what attention over the cache sees: x' = c * scale + zp, back in x's space
                    tl.store(row + tl.arange(0, D), x.to(dt))
            elif QUANT:  # kvp: [4, HKV] = k_scale, k_zp, v_scale, v_zp
                sel = 2 * is_v.to(tl.int32)
                scale = tl.load(kvp_ptr + sel * HKV + kvh)
                zp = tl.load(kvp_ptr + (sel + 1) * HKV + kvh)
                qa = tl.minimum(tl.maximum(_rint((a - zp) / scale), -128.0), 127.0)
                qb = tl.minimum(tl.maximum(_rint((b - zp) / scale), -128.0), 127.0)
                if is_v:
                    tl.store(vc_ptr + off + i, qa.to(tl.int8))
                    tl.store(vc_ptr + off + HALF + i, qb.to(tl.int8))
                else:
                    tl.store(kc_ptr + off + i, qa.to(tl.int8))
                    tl.store(kc_ptr + off + HALF + i, qb.to(tl.int8))
                a, b = qa * scale + zp, qb * scale + zp  # x' = q * scale + zp
            else:
                if is_v:
                    tl.store(vc_ptr + off + i, a.to(vc_ptr.dtype.element_ty))
                    tl.store(vc_ptr + off + HALF + i, b.to(vc_ptr.dtype.element_ty))
                else:
                    tl.store(kc_ptr + off + i, a.to(kc_ptr.dtype.element_ty))
                    tl.store(kc_ptr + off + HALF + i, b.to(kc_ptr.dtype.element_ty))
            if WRITE_BACK and not BITS:
                tl.store(row + i, a.to(dt))
                tl.store(row + HALF + i, b.to(dt))


def rope_cache_write(qkv: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, num_kv_heads: int,
                     kv_params: torch.Tensor | None = None, q_norm: torch.Tensor | None = None,
                     k_norm: torch.Tensor | None = None, eps: float = 0.0, write_back: bool = False,
                     acc: torch.Tensor | None = None, token_params: tuple[torch.Tensor, torch.Tensor] | None = None,
                     kv_transform: tuple | None = None) -> None:
    """qkv: [T, (Hq + 2 Hkv) * D]; pos, slot: [T] (cache row of each token); cos, sin: [L, D] float32;
    caches: [rows, Hkv, S, D]; kv_params: [4, Hkv] float32 (k_scale, k_zp, v_scale, v_zp) for an int8 cache;
    an online cache: uint8 codes [rows, Hkv, S, D * bits / 8] and token_params, (k, v) [rows, Hkv, S, 2] float16;
    acc: the fp32 [T, (Hq + 2 Hkv) * D] sums to read (and zero) instead of qkv; kv_transform: an online cache's
    (rot, k centers, sink buffers), kv_codes.transform_args."""
    T = qkv.shape[0]
    D = qkv.shape[1] // (num_heads + 2 * num_kv_heads)
    assert qkv.dim() == 2 and qkv.stride(-1) == 1 and qkv.shape[1] == (num_heads + 2 * num_kv_heads) * D
    assert acc is None or (acc.shape == qkv.shape and acc.stride(-1) == 1 and acc.dtype == torch.float32)
    assert pos.shape == slot.shape == (T,) and pos.is_contiguous() and slot.is_contiguous()
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert k_cache.shape[1] == num_kv_heads and D % 2 == 0 and D & (D - 1) == 0, f"head_dim {D}: a power of two"
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape[1] == D and cos.is_contiguous() and sin.is_contiguous()
    quant = k_cache.dtype == torch.int8
    assert not quant or (kv_params is not None and kv_params.shape == (4, num_kv_heads) and kv_params.is_contiguous()
                         and kv_params.dtype == torch.float32), "an int8 cache needs kv_params [4, Hkv] float32"
    bits = online_bits(k_cache, D, token_params)
    qk_norm = q_norm is not None
    dummy = cos
    assert bits or kv_transform is None, "a KV transform needs an online cache"
    targs, tconst = transform_args(kv_transform, dummy, num_kv_heads, D)
    if T:
        on = pdl(qkv)
        _rope_cache_kernel[(T, num_heads + 2 * num_kv_heads)](
            qkv, qkv.stride(0), acc if acc is not None else dummy, acc.stride(0) if acc is not None else 0, pos, slot,
            cos, sin, q_norm if qk_norm else dummy, k_norm if qk_norm else dummy, eps,
            k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            kv_params if quant else dummy, *param_args(token_params, dummy), *targs, HQ=num_heads, HKV=num_kv_heads,
            D=D, QUANT=quant, BITS=bits, **tconst, QK_NORM=qk_norm,
            WRITE_BACK=write_back, FROM_ACC=acc is not None, PDL=on, num_warps=1, launch_pdl=on)
