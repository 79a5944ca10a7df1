"""The activation-dtype rounding of the int4 kernels' epilogues, as plain functions: gemv_int4 jits them for
Triton, mma_int4 for Gluon (a Gluon kernel cannot call a Triton function under the interpreter), so both
round exactly where runtime/cpu/model.py's dense path rounds."""
import triton.language as tl


def act(v, ACT_BF16: tl.constexpr):
    """v rounded to the activation dtype, back in fp32."""
    dt: tl.constexpr = tl.bfloat16 if ACT_BF16 else tl.float16
    return v.to(dt).to(tl.float32)


def silu_mul(gate, up, ACT_BF16: tl.constexpr):
    """silu(gate) * up of fp32 GEMM outputs, each step rounded to the activation dtype (F.silu(g) * u of the
    rounded g, u); the sigmoid written out as tl.sigmoid defines it."""
    dt: tl.constexpr = tl.bfloat16 if ACT_BF16 else tl.float16
    g = gate.to(dt).to(tl.float32)
    s = (g * (1.0 / (1.0 + tl.exp(-g)))).to(dt).to(tl.float32)
    return (s * up.to(dt).to(tl.float32)).to(dt).to(tl.float32)
