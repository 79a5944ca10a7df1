"""last_to_arrive: the counter by which the last of a launch's programs to finish knows that the others' stores
are in (split-K SiLU-mul epilogues in w4_tc.py and mma_int4.py, the fused attention's merge, greedy's argmax).
"""
from __future__ import annotations

import triton
import triton.language as tl


_FENCE = tl.constexpr("fence.acq_rel.gpu;\n\tmov.b32 $0, $1;")  # orders this thread's stores before a later atomic


def last_to_arrive(cnt_ptr, n, FENCE: tl.constexpr):
    """Whether this program is the last of the ``n`` that count on the counter at cnt_ptr: every program's
    stores before the call are then visible to the last one, which resets the counter to 0 for the next launch.
    FENCE: real fences, fence.acq_rel.gpu in every thread (not in the interpreter). Plain Python, jitted twice:
    _last_to_arrive for Triton kernels and mma_int4's for Gluon (a Gluon kernel can call no Triton function
    under the interpreter), so it calls no other jitted function (the fence's operand only anchors the asm)."""
    if FENCE:
        tl.inline_asm_elementwise(_FENCE, "=r,r", [tl.program_id(0)], dtype=tl.int32, is_pure=False, pack=1)
    tl.debug_barrier()
    last = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == n - 1
    if last:
        tl.store(cnt_ptr, 0)
        if FENCE:
            tl.inline_asm_elementwise(_FENCE, "=r,r", [tl.program_id(0)], dtype=tl.int32, is_pure=False, pack=1)
    return last


_last_to_arrive = triton.jit(last_to_arrive)
