"""Triton kernels compiled for a GPU that is not here (Hopper, sm_90a): their registers, shared memory and SASS,
on any machine with Triton's bundled ptxas and cuobjdump (tests/test_kernel_sass.py pins what a kernel
compiles to).

A launch is recorded by calling the runtime's own entry point with the kernel swapped for a Recorder, so the
arguments, constexprs and launch options are exactly the runtime's; compile_sm90 specializes them as the
JIT would (16-byte aligned pointers, ints divisible by 16, ints equal to 1) and builds with PDL on.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from contextlib import contextmanager

import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

OPTIONS = ("num_warps", "num_stages", "maxnreg", "launch_pdl")
INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/")


class Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kw)`` is kept, not launched."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((grid, args, kw))


def record(module, name: str, call, others: tuple = ()) -> tuple:
    """(kernel, grid, args, kwargs) of the one launch of module.name that ``call()`` makes (the kernels in
    ``others``, launched by the same call, are recorded and dropped: names in module, or (module, name) pairs
    for kernels launched from another module)."""
    where = [(module, name), *(o if isinstance(o, tuple) else (module, o) for o in others)]
    recs = [(m, n, Recorder(getattr(m, n))) for m, n in where]
    for m, n, rec in recs:
        setattr(m, n, rec)
    try:
        call()
    finally:
        for m, n, rec in recs:
            setattr(m, n, rec.fn)
    rec = recs[0][2]
    assert len(rec.calls) == 1, f"{name}: {len(rec.calls)} launches"
    return (rec.fn, *rec.calls[0])


@contextmanager
def as_on_gpu():
    """While recording, w4_matmul.w4_matmul dispatches as it does for CUDA tensors: mma configs take the mma
    kernel, not the fallback it takes for CPU tensors."""
    from . import w4_matmul
    runs, w4_matmul.mma_runs = w4_matmul.mma_runs, lambda *_: True
    try:
        yield
    finally:
        w4_matmul.mma_runs = runs


def compile_sm90(fn, args: tuple, kw: dict):
    """triton.compile of a recorded launch for sm_90a, with PDL on."""
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kw.items() if k not in OPTIONS})
    if "PDL" in values:
        values["PDL"] = True
    opts = {k: v for k, v in kw.items() if k in OPTIONS}
    opts["launch_pdl"] = "PDL" in values
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values.get(p.name, p.default)
        if p.is_constexpr or v is None:
            sig[p.name], consts[(i,)] = "constexpr", v
            continue
        ty, attr = native_specialize_impl(CUDABackend, v, False, True, True)
        sig[p.name] = ty
        if ty == "constexpr":
            consts[(i,)] = v
        elif attr:
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as source
    return triton.compile(source(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """cuobjdump (Triton's own) on a cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, check=True).stdout


def resources(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED (static), LOCAL bytes of the cubin's kernel."""
    text = _cuobjdump(cubin, "--dump-resource-usage")
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def instructions(cubin: bytes) -> list[tuple[int, str]]:
    """(address, text) of every SASS instruction."""
    out = []
    for ln in _cuobjdump(cubin, "--dump-sass").splitlines():
        m = INSTR.match(ln)
        if m:
            out.append((int(m.group(1), 16), re.sub(r"\s*/\*[^*]*\*/\s*", " ", ln).strip()))
    return out


def hot_loop(instrs: list[tuple[int, str]]) -> list[str]:
    """The instructions of the longest stretch that ends in a branch back to its start (the main loop)."""
    where = {a: i for i, (a, _) in enumerate(instrs)}
    best: list[str] = []
    for i, (addr, text) in enumerate(instrs):
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in where:
            start = where[int(m.group(1), 16)]
            if i + 1 - start > len(best):
                best = [t for _, t in instrs[start:i + 1]]
    return best


def opcode(text: str) -> str:
    """The mnemonic of an instruction, without its predicate and modifiers ('@P0 LDG.E.128 ...' -> 'LDG')."""
    return re.sub(r"^@!?U?P[T0-9]\s+", "", text).split(" ", 1)[0].split(".", 1)[0].rstrip(";")
