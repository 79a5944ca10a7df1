"""Triton kernels of the GPU decode path (runtime/cuda/model.py, runtime/cuda/graphs.py).

    gemv_int4.py   int4 weights (as int32 words, convert/layout.pack_words) times a few rows, fused
                   prologue (RMSNorm of the input) and epilogue (bias, add into the fp32 residual, or
                   SiLU(gate) * up of w13's row pairs): the layout, the shared jit helpers, the CUDA-core
                   and tl.dot kernels; whole-weight dequantize for prefill
    w4_tc.py       the int4 tensor-core kernel (the weights as the left tl.dot operand)
    mma_int4.py    the int4 mma.sync kernel (Gluon), both operands loaded straight into registers
    w4_matmul.py   the int4 host side: w4_matmul checks shapes and dispatches a config to one of the
                   three; w4_dequantize
    norm.py        RMSNorm of the fp32 residual, SiLU(gate) * up
    rope_cache.py  rotary (+ q/k norm) and the KV-cache write, int8-quantized with quant_policy 4 or per token
                   (kv_mode int8, int4)
    attention.py   decode attention over the static cache, split along the keys, lengths read on the device,
                   and the merge of the splits
    kv_codes.py    the online KV modes: a head quantized per token as it is written (after int4's transform),
                   and the dots of attention over a tile of codes (int4 two per byte) as it is read
    attention_fused.py  the same for one-row steps, fused with rotary, the cache write and the merge
    arrive.py      last_to_arrive: the counter by which the last program of a launch finds the others' stores
    gemm_int8.py   int8 weights with one scale per row (the LM head) times a few rows
    greedy.py      greedy decoding's bookkeeping between two captured steps (argmax, positions), one kernel
    tuning.py      which config runs an int4 linear: a table per GPU model (configs/*.json, package data) and
                   a rule for shapes without an entry; pure Python
    rounding.py    the int4 epilogues' activation-dtype rounding, plain functions that Triton and Gluon jit
    offline.py     a recorded launch compiled for sm_90a without a GPU: registers, SASS (tests/test_kernel_sass.py)

Every kernel module imports triton at the top; check ``HAVE_TRITON`` before importing one.

PDL (programmatic dependent launch, Hopper and later): every kernel of the decode step lets the next one
launch at once (griddepcontrol.launch_dependents) and waits for the previous one to finish
(griddepcontrol.wait) before it reads or writes anything another kernel touches; the int4 GEMV loads its
first weight tile before waiting. The launch gap then overlaps the previous kernel's tail. ``pdl(t)``
says whether launches on t's device use it; the CUDA runner turns it off inside ``pdl_enabled(False)`` when
RuntimeOptions.pdl is False (a graph captured there keeps its launches without PDL).
"""
from __future__ import annotations

import contextvars
import os
from contextlib import contextmanager

import torch

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:  # CPU-only installs: the GPU path is off, the CPU runtime is unaffected
    HAVE_TRITON = False


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton's interpreter (tests without CUDA)


_PDL = contextvars.ContextVar("qconv_pdl", default=True)


@contextmanager
def pdl_enabled(on: bool):
    """Launches inside (this thread) use PDL only if ``on`` (and the device has it)."""
    token = _PDL.set(on)
    try:
        yield
    finally:
        _PDL.reset(token)


def pdl(t: torch.Tensor) -> bool:
    """Launch with programmatic dependent launch: CUDA sm_90+, not Triton's interpreter, not inside
    pdl_enabled(False)."""
    if t.device.type != "cuda" or INTERPRET or not _PDL.get():
        return False
    return torch.cuda.get_device_capability(t.device)[0] >= 9
