"""Triton kernels of the GPU decode path (runtime/gpu_model.py, runtime/cuda_graph.py).

    gemv_int4.py   int4 weights (the workspace layout, convert/layout.py) times a few rows, fused
                   prologue (RMSNorm or SiLU-mul of the input) and epilogue (bias, or add into the
                   fp32 residual); whole-weight dequantize for prefill
    norm.py        RMSNorm of the fp32 residual, SiLU(gate) * up
    rope_cache.py  rotary (+ q/k norm) and the KV-cache write, int8-quantized with quant_policy 4
    attention.py   decode attention over the static cache, split along the keys, lengths read on the device

Every module imports triton at the top; check ``HAVE_TRITON`` before importing one.
"""
from __future__ import annotations

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the GPU path is off, the CPU runtime is unaffected
    HAVE_TRITON = False
