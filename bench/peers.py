"""Peer int4 implementations timed in the same run as ours (issue 28): gemlite 0.6 (Triton, its shipped H100 configs)
and torchao 0.18 (Int4WeightOnlyConfig) per linear shape, and torchao end to end (the gpt-fast recipe: a static
cache and torch.compile) at batch 1. Both are carried as wheels; install them where the run can import them:

    pip install --no-deps --target /tmp/peers .carry/wheels/*.whl && export PYTHONPATH=/tmp/peers:$PYTHONPATH

A peer that cannot run gives the reason instead of a time, recorded as such.
"""
from __future__ import annotations

import statistics
import time
import traceback

import torch

from bench.gpu_micro import copies_for, graph_us

TORCHAO_FORMATS = ("tile_packed_to_4d", "plain")  # tinygemm's layout (torch's own kernel), then torchao's default


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__


def gemlite_linear(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int):
    """A gemlite A16W4 linear of codes [N, K] 0..15, scales / zeros [N, K/group] (w = (q - z) * s), fp16."""
    from gemlite.helper import A16Wn
    return A16Wn(device=str(codes.device), dtype=torch.float16).from_weights(
        codes.to(torch.uint8), scales.half(), zeros.half(), 4, group)


def torchao_linear(w: torch.Tensor, group: int, fmt: str):
    """An nn.Linear of w [N, K] (bf16) quantized by torchao's Int4WeightOnlyConfig in packing format ``fmt``."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=torch.bfloat16)
    lin.weight.data.copy_(w)
    quantize_(lin, Int4WeightOnlyConfig(group_size=group, int4_packing_format=fmt))
    return lin


def kernel_rows(N: int, K: int, rows: list[int], group: int = 128) -> dict:
    """{peer: {M: µs or the reason it cannot run}} for one [N, K] int4 weight, each timed as bench.gpu_micro times
    ours (a CUDA graph over weight copies that overflow L2), after a check against the dequantized reference."""
    dev = torch.device("cuda")
    n = copies_for(N * K // 2 + N * (K // group) * 3)
    codes = torch.randint(0, 16, (N, K), device=dev, dtype=torch.uint8)
    scales = torch.rand(N, K // group, device=dev) * 0.02 + 0.001
    zeros = torch.randint(0, 16, (N, K // group), device=dev).float()
    w = ((codes.float().view(N, K // group, group) - zeros[..., None]) * scales[..., None]).view(N, K)
    out: dict[str, dict] = {}
    try:
        lins = [gemlite_linear(codes, scales, zeros, group) for _ in range(n)]
        out["gemlite"] = _time_rows(lambda i, x: lins[i](x), w, rows, torch.float16, n)
    except Exception as e:  # noqa: BLE001  (a peer that cannot run is recorded, with why)
        out["gemlite"] = {"error": _reason(e)}
    for fmt in TORCHAO_FORMATS:
        try:
            lins = [torchao_linear(w.bfloat16(), group, fmt) for _ in range(n)]
            out[f"torchao {fmt}"] = _time_rows(lambda i, x: lins[i](x), w, rows, torch.bfloat16, n)
        except Exception as e:  # noqa: BLE001
            out[f"torchao {fmt}"] = {"error": _reason(e)}
        lins = None
        torch.cuda.empty_cache()
    return out


def _time_rows(fn, w: torch.Tensor, rows: list[int], dtype: torch.dtype, n: int) -> dict:
    res = {}
    for M in rows:
        x = torch.randn(M, w.shape[1], device=w.device, dtype=dtype)
        want = x.float() @ w.t()
        err = ((fn(0, x).float() - want).norm() / want.norm()).item()
        if err > 2e-2:
            res[M] = f"wrong results (relative error {err:.2e})"
            continue
        res[M] = graph_us(lambda i: fn(i, x), n)
    return res


def torchao_decode(config: dict, tokens: int = 256, prompt_len: int = 32, runs: int = 3) -> dict:
    """End-to-end batch-1 greedy decode of a random-weight HF model of ``config`` quantized by torchao int4 (g128,
    tinygemm layout), with a static KV cache and torch.compile(mode="reduce-overhead") of the forward (the gpt-fast
    recipe): tok/s of ``tokens`` new tokens after a compile-and-warm-up run, median of ``runs``."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
        from transformers import AutoConfig, AutoModelForCausalLM
        cfg = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k not in (
            "model_type", "architectures", "transformers_version", "torch_dtype", "dtype")})
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
        quantize_(model, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
                  filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and "lm_head" not in name)
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), device="cuda")

        def gen():
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                     min_new_tokens=tokens, do_sample=False, pad_token_id=0)
            assert out.shape[1] == prompt_len + tokens
        t0 = time.perf_counter()
        gen()
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(runs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            gen()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return {"decode_tok_s": tokens / statistics.median(times), "first_run_s": compile_s,
                "recipe": "torchao Int4WeightOnlyConfig(128, tile_packed_to_4d) on all but lm_head (bf16), static "
                          "cache, torch.compile(model.forward, mode='reduce-overhead', fullgraph=True)"}
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        return {"error": _reason(e)}
    finally:
        torch.cuda.empty_cache()

