"""Triton kernels of the GPU decode path (runtime/cuda/model.py, runtime/cuda/graphs.py).

    gemv_int4.py   int4 weights (as int32 words, convert/layout.pack_words) times a few rows, fused
                   prologue (RMSNorm of the input) and epilogue (bias, add into the fp32 residual, or
                   SiLU(gate) * up of w13's row pairs); whole-weight dequantize for prefill
    norm.py        RMSNorm of the fp32 residual, SiLU(gate) * up
    rope_cache.py  rotary (+ q/k norm) and the KV-cache write, int8-quantized with quant_policy 4
    attention.py   decode attention over the static cache, split along the keys, lengths read on the device;
                   for one-row steps fused with rotary, the cache write and the merge of the splits
    gemm_int8.py   int8 weights with one scale per row (the LM head) times a few rows
    tuning.py      which config runs an int4 linear: a table per GPU model (configs/*.json, package data) and
                   a rule for shapes without an entry; pure Python

Every kernel module imports triton at the top; check ``HAVE_TRITON`` before importing one.

PDL (programmatic dependent launch, Hopper and later): every kernel of the decode step lets the next one
launch at once (griddepcontrol.launch_dependents) and waits for the previous one to finish
(griddepcontrol.wait) before it reads or writes anything another kernel touches; the int4 GEMV loads its
first weight tile before waiting. The launch gap then overlaps the previous kernel's tail. ``pdl(t)``
says whether launches on t's device use it (QCONV_PDL=0 turns it off).
"""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the GPU path is off, the CPU runtime is unaffected
    HAVE_TRITON = False


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton's interpreter (tests without CUDA)


def pdl(t: torch.Tensor) -> bool:
    """Launch with programmatic dependent launch: CUDA sm_90+, not Triton's interpreter, not QCONV_PDL=0."""
    if t.device.type != "cuda" or INTERPRET or os.environ.get("QCONV_PDL") == "0":
        return False
    return torch.cuda.get_device_capability(t.device)[0] >= 9
