"""Kernel microbenchmarks of the GPU decode path, for bench.gpu_runtime (alone with --kernels-only).

Every timing is a CUDA graph of one call per weight (or cache) copy, with enough distinct copies to
overflow L2 twice, as a decode step reads each layer's weights once: µs per call = replay time / copies.
  linears    per decode role (qkv: RMSNorm + bias, o: += residual, w13: RMSNorm + SiLU-mul epilogue, w2: += residual)
             and rows M: the Triton kernel over a config sweep (best reported, not applied: the kernel
             config tables come from bench.gpu_graph_sweep),
             torch's tinygemm (_weight_int4pack_mm, bf16), dequantize + cuBLAS, and cuBLAS on fp16 weights
  attention  decode_attention over fp16 / int8 caches at a few contexts, rows and split settings
Effective TB/s = bytes the op must read (int4 codes + scales + zeros, or fp16 weights, or the K/V) / time.
"""
from __future__ import annotations

import math
import statistics
import traceback
from dataclasses import asdict

import torch
import torch.nn.functional as F

from bench.common import log
from qconv.convert.layout import pack_int4, pack_words, unpack_words
from qconv.runtime.cuda.linear import tinygemm_pack
from qconv.runtime.cuda.kernels.attention import decode_attention, num_splits
from qconv.runtime.cuda.kernels.w4_matmul import GemvConfig, w4_dequantize, w4_matmul


def graph_us(fn, copies: int, reps: int = 15) -> float:
    """fn(i) for each copy i, captured as one CUDA graph -> median µs per call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):  # compile and warm up outside the capture
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) * 1000 / copies


def copies_for(nbytes: int) -> int:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(2, min(64, math.ceil(2 * l2 / max(nbytes, 1))))


def shapes_of(cfg: dict) -> dict[str, tuple[int, int]]:
    """Decode role -> (N, K) from an HF config dict."""
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    hq, hkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    D = cfg.get("head_dim") or H // hq
    return {"qkv": ((hq + 2 * hkv) * D, H), "o": (H, hq * D), "w13": (2 * I, H), "w2": (H, I)}


# role -> (prologue, epilogue, bias); qkv may also split K and add into an fp32 buffer (read and zeroed by
# the rope kernel: GpuLinear.accumulates)
ROLES = {"qkv": ("rmsnorm", "store", True), "o": ("none", "residual", False), "w13": ("rmsnorm", "silu", False),
         "w2": ("none", "residual", False)}
ACCUMULATES = ("qkv",)


def sweep_configs(M: int, K: int, group: int, residual: bool, full: bool, prologue: str = "none") -> list[GemvConfig]:
    """One row: _gemv (rows per program x words per thread x warps) and _gemm padded; several rows: _gemm
    (block rows x warps / pipeline stages); with the residual epilogue also split-K (a run-time argument:
    splits cost no compile), except one row with RMSNorm in _gemv (the norm is applied at the end)."""
    splits = [s for s in (1, 2, 4, 8, 16) if K // group >= 2 * s] if residual else [1]
    dot = [(4, 2), (4, 3), (4, 4), (8, 3)] if full else [(4, 3)]
    out = [GemvConfig(bn, s, w, st, True) for bn in (16, 32, 64, 128) for w, st in dot for s in splits]
    if M == 1:
        g_splits = [1] if prologue == "rmsnorm" else splits
        out += [GemvConfig(bn, s, w, 1, False, v) for bn in (8, 16) for v in (2, 4) for w in (1, 2)
                for s in g_splits if (group // 8) % v == 0]
    return out


def bench_linears(cfg: dict, group: int = 128, rows=(1, 8), full: bool = False) -> tuple[list[dict], dict]:
    """-> (rows of results, {(M bucket, N, K): best GemvConfig}) for the fused decode ops."""
    results, tuned = [], {}
    dev = torch.device("cuda")
    for role, (N, K) in shapes_of(cfg).items():
        prologue, epilogue, has_bias = ROLES[role]
        int4_bytes = N * K // 2 + N * (K // group) * 3
        n = copies_for(int4_bytes)
        words = [pack_words(torch.randint(0, 16, (N, K), dtype=torch.int32, device=dev), group) for _ in range(n)]
        scales = [(torch.rand(N, K // group, device=dev) * 0.02 + 0.001).half() for _ in range(n)]
        zeros = [torch.randint(0, 16, (N, K // group), dtype=torch.uint8, device=dev) for _ in range(n)]
        bias = torch.randn(N, device=dev).half() if has_bias else None
        nw = torch.rand(K, device=dev).half() + 0.5
        ref_w = w4_dequantize(words[0], scales[0], zeros[0], group, torch.empty(N, K, device=dev)).float()
        n_out = N // 2 if epilogue == "silu" else N
        for M in rows:
            x = torch.randn(M, K, device=dev, dtype=torch.float32 if prologue == "rmsnorm" else torch.float16)
            out = torch.zeros(M, n_out, device=dev, dtype=torch.float32 if epilogue == "residual" else torch.float16)
            acc = torch.zeros(M, N, device=dev, dtype=torch.float32)
            row = {"role": role, "N": N, "K": K, "M": M, "int4_bytes": int4_bytes}
            # Triton, fused as in the decode step: the config sweep
            configs = sweep_configs(M, K, group, epilogue == "residual", full, prologue)
            if role in ACCUMULATES:
                configs += [c for c in sweep_configs(M, K, group, True, full, prologue) if c.split_k > 1]
            timed = []
            for c in configs:
                epi = "residual" if (epilogue == "residual" or c.split_k > 1) else epilogue
                dst = acc if epi == "residual" and epilogue != "residual" else out
                try:
                    us = graph_us(lambda i, c=c, epi=epi, dst=dst: w4_matmul(
                        x, words[i], scales[i], zeros[i], group, dst, bias=bias, prologue=prologue, norm_weight=nw,
                        eps=1e-6, epilogue=epi, config=c), n)
                    timed.append((us, c))
                except Exception as e:  # noqa: BLE001  (one bad config must not stop the sweep)
                    log(f"    {role} M={M} {c}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            timed.sort(key=lambda t: t[0])
            if timed:
                us, best = timed[0]
                tuned[(1 if M == 1 else 16, N, K)] = best
                row["triton_us"], row["triton_cfg"] = us, str(best)
                row["triton_top3"] = [(round(t, 2), str(c)) for t, c in timed[:3]]
                epi = "residual" if (epilogue == "residual" or best.split_k > 1) else epilogue
                row["triton_ok"] = _check_triton(x, words[0], scales[0], zeros[0], group, ref_w, nw, bias, prologue,
                                                 epi, best)
            # the plain matmul candidates on h (the prologue's output), [M, K] fp16 / bf16
            h = torch.randn(M, K, device=dev, dtype=torch.float16)
            want = h.float() @ ref_w.t()
            row.update(_tinygemm(h, words, scales, zeros, group, want, n))
            scratch = torch.empty(N, K, device=dev, dtype=torch.float16)
            row["dequant_cublas_us"] = _try(lambda: graph_us(lambda i: F.linear(h, w4_dequantize(
                words[i], scales[i], zeros[i], group, scratch)), n))
            nd = copies_for(N * K * 2)
            dense = [torch.randn(N, K, device=dev, dtype=torch.float16) * 0.02 for _ in range(nd)]
            row["cublas_fp16_us"] = _try(lambda: graph_us(lambda i: F.linear(h, dense[i]), nd))
            row["fp16_bytes"] = N * K * 2
            del dense
            results.append(row)
            log(f"  {role:4s} [{N}x{K}] M={M}: " + ", ".join(
                f"{k[:-3]} {row[k]:.1f} µs ({row[b] / row[k] / 1e6:.2f} TB/s)"
                for k, b in (("triton_us", "int4_bytes"), ("tinygemm_us", "int4_bytes"),
                             ("dequant_cublas_us", "int4_bytes"), ("cublas_fp16_us", "fp16_bytes"))
                if isinstance(row.get(k), float)))
        del words, scales, zeros
        torch.cuda.empty_cache()
    return results, tuned


def _check_triton(x, words, scales, zeros, group, ref_w, nw, bias, prologue, epilogue, cfg) -> bool:
    N, K = ref_w.shape
    if prologue == "rmsnorm":
        h = (nw.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).half().float()).half().float()
    else:
        h = x.float()
    want = h @ ref_w.t() + (bias.float() if bias is not None else 0)
    M = x.shape[0]
    if epilogue == "silu":
        want = F.silu(want[:, 0::2].half().float()).half().float() * want[:, 1::2].half().float()
        out = torch.empty(M, N // 2, device=x.device, dtype=torch.float16)
    elif epilogue == "residual":
        base = torch.randn(M, N, device=x.device)
        out = base.clone()
    else:
        out = torch.empty(M, N, device=x.device, dtype=torch.float16)
    w4_matmul(x, words, scales, zeros, group, out, bias=bias, prologue=prologue, norm_weight=nw, eps=1e-6,
              epilogue=epilogue, config=cfg)
    got = out - base if epilogue == "residual" else out.float()
    return bool(((got - want).norm() / want.norm()).item() < 1e-2)


def _tinygemm(h, words, scales, zeros, group, want, n) -> dict:
    """torch's int4 CUDA kernel (bf16 activations): the nibble order that reproduces ``want``, and its time."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm") or group not in (32, 64, 128, 256):
        return {"tinygemm": "unavailable"}
    codes = [pack_int4(unpack_words(w, group)) for w in words]
    hb = h.bfloat16()
    for swap in (True, False):
        try:
            packed0, sz0 = tinygemm_pack(codes[0], scales[0], zeros[0], swap_nibbles=swap)
            got = torch.ops.aten._weight_int4pack_mm(hb, packed0, group, sz0).float()
        except Exception as e:  # noqa: BLE001
            return {"tinygemm": f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        if ((got - want).norm() / want.norm()).item() < 2e-2:
            packs = [tinygemm_pack(codes[i], scales[i], zeros[i], swap_nibbles=swap) for i in range(n)]
            us = _try(lambda: graph_us(lambda i: torch.ops.aten._weight_int4pack_mm(hb, packs[i][0], group,
                                                                                       packs[i][1]), n))
            return {"tinygemm": f"ok (swap_nibbles={swap})", "tinygemm_us": us}
    return {"tinygemm": "wrong results with either nibble order"}


def _try(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"


def bench_attention(cfg: dict, contexts=(512, 4096), rows=(1, 8), full: bool = False) -> list[dict]:
    hq, hkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    D = cfg.get("head_dim") or cfg["hidden_size"] // hq
    L = cfg["num_hidden_layers"]
    dev, out = torch.device("cuda"), []
    for quant in (False, True):
        for ctx in contexts:
            for B in rows:
                shape = (B, hkv, ctx, D)
                if quant:
                    kc = [torch.randint(-128, 128, shape, dtype=torch.int8, device=dev) for _ in range(L)]
                    vc = [torch.randint(-128, 128, shape, dtype=torch.int8, device=dev) for _ in range(L)]
                    kvp = torch.tensor([[0.02] * hkv, [0.1] * hkv, [0.02] * hkv, [-0.1] * hkv], device=dev)
                else:
                    kc = [torch.randn(shape, dtype=torch.float16, device=dev) for _ in range(L)]
                    vc = [torch.randn(shape, dtype=torch.float16, device=dev) for _ in range(L)]
                    kvp = None
                q = torch.randn(B, hq * D, device=dev, dtype=torch.float16)
                pos = torch.full((B,), ctx - 1, device=dev, dtype=torch.int64)
                slot = torch.arange(B, device=dev)
                o = torch.empty(B, hq * D, device=dev, dtype=torch.float16)
                kv_bytes = 2 * B * hkv * ctx * D * (1 if quant else 2)
                base = num_splits(B, hkv, ctx)
                timed = []
                for bn in ((32, 64, 128) if full else (32, 64)):
                    for ns in sorted({max(1, base // 2), base, min(128, base * 2)} if full else {base, base * 2}):
                        us = _try(lambda: graph_us(lambda i: decode_attention(
                            q, pos, slot, kc[i], vc[i], hq, o, kvp, splits=ns, block_n=bn), L))
                        if isinstance(us, float):
                            timed.append((us, bn, ns))
                timed.sort()
                r = {"kv": "int8" if quant else "fp16", "ctx": ctx, "B": B, "kv_bytes": kv_bytes,
                     "default_splits": base}
                if timed:
                    r.update(best_us=timed[0][0], best_block_n=timed[0][1], best_splits=timed[0][2],
                             default_us=next((t for t, bn, ns in timed if bn == 64 and ns == base), None))
                    log(f"  attention {r['kv']} ctx {ctx} B={B}: best {timed[0][0]:.1f} µs (block_n {timed[0][1]}, "
                        f"splits {timed[0][2]}), {kv_bytes / timed[0][0] / 1e6:.2f} TB/s; default "
                        f"{r['default_us'] or float('nan'):.1f} µs")
                out.append(r)
                del kc, vc
    return out


def tuned_json(tuned: dict) -> list[dict]:
    return [{"key": list(k), "config": asdict(c)} for k, c in sorted(tuned.items())]


def print_tuned(tuned: dict) -> None:
    log("best alone per (rows bucket, N, K), reported only:")
    for key, c in sorted(tuned.items()):
        log(f"    {key}: {c}")
