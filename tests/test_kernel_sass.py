"""What the GPU path's int4 kernels compile to for the H100 / H200 (sm_90a), built here without a GPU
(runtime/cuda/kernels/offline.py, Triton's own ptxas and cuobjdump).

The mma.sync kernel's point is its main loop: operands loaded straight into the registers that feed the
tensor cores, so no shared memory, no barrier and no local memory there, and few instructions per weight.
A Triton or code change that brings a layout conversion back through shared memory fails here, on the CPU.
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.experimental.gluon", reason="Gluon (Triton >= 3.4) is not installed")

from qconv.runtime.cuda.kernels.w4_matmul import GemvConfig  # noqa: E402


_BUILD = """
import json, sys, torch
from qconv.convert.layout import group_major
from qconv.runtime.cuda.kernels import mma_int4, offline
from qconv.runtime.cuda.kernels.w4_matmul import GemvConfig, w4_matmul
M, N, K, epilogue, cfg = sys.argv[1:]
M, N, K, cfg = int(M), int(N), int(K), GemvConfig(**json.loads(cfg))
x = torch.zeros(M, K, dtype=torch.float16)
words = group_major(torch.zeros(N, K // 8, dtype=torch.int32), 128)  # the runtime's layout
s, z = torch.zeros(N, K // 128, dtype=torch.float16), torch.zeros(N, K // 128, dtype=torch.uint8)
out = torch.zeros(M, N // 2 if epilogue == "silu" else N, dtype=torch.float32 if epilogue == "residual" else torch.float16)
with offline.as_on_gpu():  # the GPU's path, not the CPU's fallback
    fn, _, args, kw = offline.record(mma_int4, "_w4_mma_kernel", lambda: w4_matmul(
        x, words, s, z, 128, out, epilogue=epilogue, config=cfg))
try:
    cubin = offline.compile_sm90(fn, args, kw).asm["cubin"]
except (FileNotFoundError, RuntimeError) as e:  # no NVIDIA backend tools in this Triton build
    print(json.dumps({"skip": str(e)[:300]})); sys.exit(0)
print(json.dumps({"resources": offline.resources(cubin),
                  "loop": [offline.opcode(t) for t in offline.hot_loop(offline.instructions(cubin))]}))
"""


def compiled(M, N, K, epilogue, cfg):
    """(resources, hot-loop opcodes) of the cubin w4_matmul launches for a decode role: its launch recorded on CPU
    tensors and built for sm_90a in a fresh process, since Triton's interpreter (which the other kernel tests run
    in this one) patches triton.language for good once it has run a kernel."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-c", _BUILD, str(M), str(N), str(K), epilogue,
                        json.dumps(dataclasses.asdict(cfg))], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(f"cannot build for sm_90a here: {res['skip']}")
    return res["resources"], res["loop"]


@pytest.mark.parametrize("M,N,K,epilogue,cfg,per_weight", [
    (8, 17920, 1536, "silu", GemvConfig(128, 3, 4, dot=True, mma=True), 2.7),     # w13 of qwen2.5-1.5b, 8 rows
    (8, 1536, 8960, "residual", GemvConfig(64, 9, 4, dot=True, mma=True), 2.7),   # w2
    (16, 2048, 1536, "residual", GemvConfig(64, 4, 2, dot=True, mma=True), 3.4),  # qkv, 16 rows (two mma columns)
    # one row, as the H100 / H200 tables run o and w2; o's weights 3 groups ahead: moving the three groups' registers
    # along costs ~27 instructions a group (183 for 64 weights per thread, 156 at pf 1)
    (1, 1536, 1536, "residual", GemvConfig(64, 12, 4, dot=True, mma=True, pf=3), 3.0),
    (1, 1536, 8960, "residual", GemvConfig(64, 35, 2, dot=True, mma=True), 2.7),
])
def test_mma_main_loop_takes_no_shared_memory(M, N, K, epilogue, cfg, per_weight):
    res, ops = compiled(M, N, K, epilogue, cfg)
    assert res["LOCAL"] == 0 and res["STACK"] == 0, res

    bm = 8 if M <= 8 else 16  # rows per program (one row: 7 of the mma's 8 columns unused)
    assert ops.count("HMMA") == 8 * cfg.block_n // (16 * cfg.num_warps) * (bm // 8)  # 8 chunks per tile per group
    assert not {"LDS", "STS", "LDSM", "STSM", "BAR", "LDL", "STL"} & set(ops), sorted(set(ops))
    weights_per_thread = cfg.block_n * 128 // (32 * cfg.num_warps)  # one group of the program's outputs
    assert len(ops) / weights_per_thread < per_weight, f"{len(ops)} instructions for {weights_per_thread} weights"


_BUILD_ATTN = """
import json, sys, torch
from qconv.runtime.cuda.kernels import attention, attention_fused, offline
quant, bits = sys.argv[1] == "int8", {"online8": 8, "online4": 4, "online4t": 4}.get(sys.argv[1], 0)
HQ, HKV, D, S = 12, 2, 128, 4608  # qwen2.5-1.5b
qkv = torch.zeros(1, (HQ + 2 * HKV) * D)
pos, slot, cos = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), torch.zeros(S, D)
cache = torch.zeros(1, HKV, S, D, dtype=torch.int8 if quant else torch.float16)
params = None
if bits:  # online codes: uint8 [.., D * bits / 8] and (scale, zp) per token
    cache = torch.zeros(1, HKV, S, D * bits // 8, dtype=torch.uint8)
    params = (torch.zeros(1, HKV, S, 2, dtype=torch.float16), torch.zeros(1, HKV, S, 2, dtype=torch.float16))
transform = None
if sys.argv[1] == "online4t":  # int4's transform: the rotation, K centers, one sink position
    from qconv.convert.quant import kv_rotation
    from qconv.runtime.cuda.kernels.kv_codes import hadamard_pm
    sink = torch.zeros(1, HKV, 1, D, dtype=torch.float16)
    transform = (hadamard_pm(kv_rotation(D)), torch.zeros(HKV, D), (sink, sink.clone()))
out = torch.zeros(1, HQ * D, dtype=torch.float16)
fn, _, args, kw = offline.record(attention_fused, "_attn_fused_kernel", lambda: attention_fused.decode_attention_fused(
    qkv, pos, slot, cos, cos, cache, cache, HQ, out, kv_params=torch.ones(4, HKV) if quant else None, merge=False,
    sums=True, int8_in_registers=quant, token_params=params, kv_transform=transform),
    others=((attention, "_attn_combine_kernel"),))
try:
    cubin = offline.compile_sm90(fn, args, kw).asm["cubin"]
except (FileNotFoundError, RuntimeError) as e:
    print(json.dumps({"skip": str(e)[:300]})); sys.exit(0)
print(json.dumps({"loop": [offline.opcode(t) for t in offline.hot_loop(offline.instructions(cubin))],
                  "resources": offline.resources(cubin)}))
"""


def attention_build(cache: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-c", _BUILD_ATTN, cache], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(f"cannot build for sm_90a here: {res['skip']}")
    return res


def attention_loop(cache: str) -> list[str]:
    return attention_build(cache)["loop"]


def test_int8_cache_tiles_reach_the_dots_as_fp16_does():
    """int8_in_registers: the int8 cache's K and V tiles are converted to fp16 in the registers they were loaded
    into, so the tl.dot operands go through shared memory as fp16 and come back by LDSM, as an fp16 cache's do.
    Converted after shared memory (the default, faster for its asynchronous copies), V is gathered byte by byte
    along keys: 664 hot-loop instructions with 100 LDS, against 420 with 17 (attention._int8_as, IN_REGISTERS)."""
    int8, fp16 = attention_loop("int8"), attention_loop("fp16")
    assert int8.count("LDSM") >= fp16.count("LDSM") - 4 and int8.count("LDS") <= 2 * fp16.count("LDS") + 8
    assert len(int8) < 1.4 * len(fp16), (len(int8), len(fp16))


def test_online_cache_tiles_reach_the_dots_as_codes():
    """Online int8 / int4 caches: the dots run over the codes (1024 + c as fp16, by bit operations), and each key's
    scale and zero point fold into its score or probability (kv_codes._code_scores / _code_values): no int-to-float
    conversion and no dequantizing FMA per element in the hot loop. int4's nibbles cost it no more instructions
    than int8 (both 944 at llama-3-8b's shapes, against 1130 and 1573 dequantizing each element as loaded)."""
    online8, online4, fp16 = attention_loop("online8"), attention_loop("online4"), attention_loop("fp16")
    for ops in (online8, online4):
        assert not {"I2F", "I2FP"} & set(ops), sorted(set(ops))
        assert ops.count("HMMA") == fp16.count("HMMA") and ops.count("FFMA") <= 48
    assert len(online4) <= 1.05 * len(online8), (len(online4), len(online8))


def test_the_int4_transform_compiles_without_spilling():
    """int4's rotation (q R before the dots, the output times R after: _rotate_rows, fp16 dots with the +-1
    Hadamard) and sink tile add no local memory to the fused kernel, and its hot loop stays the plain int4 one's."""
    t, plain = attention_build("online4t"), attention_build("online4")
    assert t["resources"]["STACK"] == 0 and t["resources"]["LOCAL"] == 0, t["resources"]
    assert len(t["loop"]) <= 1.05 * len(plain["loop"]), (len(t["loop"]), len(plain["loop"]))
