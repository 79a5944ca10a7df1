"""The int4 kernel config tables (runtime/cuda/kernels/configs/*.json) and their loader, kernels/tuning.py: every
shipped table reads, a shape in a table gets its entry, any other shape gets a config the kernel can run, and a GPU
without a table gets the rule alone."""
import itertools
import json
from dataclasses import asdict

import pytest
import torch

from qconv.runtime.cuda.kernels import tuning
from qconv.runtime.cuda.kernels.tuning import GemvConfig, config_for, lookup, misfit, rule

TABLES = sorted(tuning.CONFIGS.glob("*.json"))
EPILOGUES = ("store", "residual", "silu")
PROLOGUES = ("none", "rmsnorm", "silu")
# shapes no shipped table holds: llama-2-7b's qkv, w2, w13 (gate/up) and o, odd and tiny N
UNSEEN = [(12288, 4096), (4096, 11008), (22016, 4096), (4352, 4352), (4097, 4096), (1, 256), (41, 384)]


def entries(path):
    return json.loads(path.read_text())["entries"]


def test_the_h100_and_h200_tables_ship():
    assert {p.name for p in TABLES} >= {"NVIDIA_H100_80GB_HBM3.json", "NVIDIA_H200.json"}


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.stem)
def test_every_table_reads_and_each_entry_is_a_config_the_kernel_runs(path):
    data = json.loads(path.read_text())
    assert set(data) == {"gpu", "written_by", "entries"} and data["entries"]
    assert tuning.file_for(data["gpu"]) == path  # the file is found under the name torch gives the GPU
    assert "bench.gpu_graph_sweep" in data["written_by"]
    table = tuning.read_table(path)
    assert len(table) == len(data["entries"])
    for e in data["entries"]:
        cfg = GemvConfig(**e["config"])
        assert e["m"] in (1, 8, 16) and e["k"] % e["group"] == 0
        assert misfit(cfg, e["group"], "residual") is None, e  # the epilogue every split config may take


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.stem)
def test_a_shape_in_the_table_gets_its_entry(path):
    gpu = json.loads(path.read_text())["gpu"]
    for e in entries(path):
        want = GemvConfig(**e["config"])
        for m in {1: (1,), 8: (2, 5, 8), 16: (9, 16, 64)}[e["m"]]:  # the buckets: one row, 2-8 rows, more
            assert lookup(gpu, m, e["n"], e["k"], e["group"]) == want
            # the decode step's fusions: residual (o, w2, and a split qkv / w13 accumulating into fp32 sums)
            assert config_for(gpu, m, e["n"], e["k"], e["group"], "residual") == want
            if want.split_k == 1:
                assert config_for(gpu, m, e["n"], e["k"], e["group"], "store") == want
            else:  # a split entry cannot store: the rule serves that call (prefill through the kernel)
                got = config_for(gpu, m, e["n"], e["k"], e["group"], "store")
                assert got == rule(m, e["n"], e["k"], e["group"], "store") and misfit(got, e["group"], "store") is None
        other = 64 if e["group"] != 64 else 128  # the key holds the group: another group is not this entry
        assert lookup(gpu, e["m"], e["n"], e["k"], other) is None


@pytest.mark.parametrize("gpu", ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", None])
def test_unseen_shapes_get_a_config_the_kernel_runs(gpu):
    for (n, k), m, group, epi, pro, sms in itertools.product(UNSEEN, (1, 2, 8, 16, 64), (32, 64, 128, 1024),
                                                            EPILOGUES, PROLOGUES, (132, 108)):
        if k % group or (epi == "silu" and n % 2):
            continue
        assert lookup(gpu, m, n, k, group) is None
        cfg = config_for(gpu, m, n, k, group, epi, pro, sms)
        assert cfg == rule(m, n, k, group, epi, pro, sms)
        assert misfit(cfg, group, epi, pro) is None, (n, k, m, group, epi, pro, cfg)
        assert cfg.rows == 1 and not cfg.fuse_norm and not cfg.tc  # never what lost in every sweep
        assert not cfg.mma or group == 128  # the mma kernel's group
        assert cfg.split_k == 1 or (epi in ("residual", "silu") and k // group >= cfg.split_k)
        if cfg.mma and cfg.split_k > 1:  # K split into about four programs per SM (one at 2-8 rows), unless the
            programs = -(-n // cfg.block_n) * cfg.split_k  # groups run out
            per_sm = (0.5, 2) if 1 < m <= 8 else (2, 8)
            assert per_sm[0] * sms <= programs <= per_sm[1] * sms or cfg.split_k == k // group, (n, k, m, cfg)


def test_the_rule_on_the_swept_7b_shapes():
    """The configs the rule gives the 7B-8B roles that the kernel sweep timed (bench/RESULTS.md, "int4 kernels across
    shapes"): the mma kernel, 128 outputs, K split for about four programs per SM at one row; at 2-8 rows, 256
    outputs and 8 warps, K split for about one program per SM, the weights three groups ahead."""
    want = {(1, 4608, 3584, "residual"): 15, (1, 3584, 18944, "residual"): 19, (1, 37888, 3584, "silu"): 2,
            (1, 6144, 4096, "residual"): 11, (16, 37888, 3584, "silu"): 1, (16, 3584, 3584, "residual"): 19}
    for (m, n, k, epi), split in want.items():
        cfg = rule(m, n, k, 128, epi, "rmsnorm", 132)
        assert (cfg.mma, cfg.block_n, cfg.num_warps, cfg.split_k) == (True, 128, 4, split), (m, n, k, cfg)
    for (m, n, k), split in {(8, 4608, 3584): 7, (8, 3584, 3584): 9, (8, 28672, 4096): 1, (2, 4096, 14336): 8}.items():
        assert rule(m, n, k, 128, "residual") == GemvConfig(256, split, 8, dot=True, mma=True, pf=3)
    # qwen2.5-7b's w13 at 8 rows, qwen2.5-32b's at 16: 296 / 432 blocks of outputs fill the SMs, K stays whole;
    # three groups ahead at 8 rows (1.41x slower without), one at 16 (32b: 1.8x slower three ahead)
    assert rule(8, 37888, 3584, 128, "silu") == GemvConfig(128, 1, 4, dot=True, mma=True, pf=3)
    assert rule(16, 55296, 5120, 128, "silu") == GemvConfig(128, 1, 4, dot=True, mma=True, pf=1)
    # qwen2.5-0.5b's o at one row: 7 blocks x 7 groups; 32 outputs a program, one group a slice
    assert rule(1, 896, 896, 128, "residual") == GemvConfig(32, 7, 2, dot=True, mma=True, pf=3)
    assert not rule(1, 1152, 896, 128, "residual", "rmsnorm").mma  # its qkv: the GEMV with the norm fused
    assert not rule(1, 4608, 3584, 64, "residual").mma  # another group: the GEMV


def test_a_gpu_without_a_table_takes_the_rule():
    n, k = 2048, 1536  # qwen2.5-1.5b's qkv, in the H200 table
    assert lookup("NVIDIA H200", 1, n, k, 128) is not None
    for gpu in ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 PCIe", None):
        assert tuning.table_for(gpu) == {}
        assert lookup(gpu, 1, n, k, 128) is None
        assert config_for(gpu, 1, n, k, 128, "residual") == rule(1, n, k, 128, "residual")


def test_misfit_names_what_the_kernel_refuses():
    assert "split-K" in misfit(GemvConfig(32, 2), 128, "store")
    assert misfit(GemvConfig(32, 2), 128, "residual") is None
    assert misfit(GemvConfig(64, 2, tc=True), 128, "silu") is None  # the tensor-core kernels' split SiLU-mul
    assert "RMSNorm" in misfit(GemvConfig(8, 2, 1, 1, False, 2), 128, "residual", "rmsnorm")
    assert "group" in misfit(GemvConfig(8, 1, 1, 1, False, 2), 1024)  # 64 thread-columns a group, 32 in one warp
    assert misfit(GemvConfig(8, 1, 2, 1, False, 2), 1024) is None
    assert "rows" in misfit(GemvConfig(8, 1, 1, 1, False, 2, rows=3), 128)


def test_written_tables_read_back(tmp_path):
    table = {(1, 96, 256, 64): GemvConfig(8, 2, 1, 1, False, 4), (16, 96, 256, 64): GemvConfig(64, 2, 2, mma=True)}
    path = tmp_path / "gpu.json"
    tuning.write_table(path, "Some GPU", table, "python -m bench.gpu_graph_sweep --write-table",
                       {(1, 96, 256, 64): "o"})
    data = json.loads(path.read_text())
    assert (data["gpu"], data["written_by"]) == ("Some GPU", "python -m bench.gpu_graph_sweep --write-table")
    assert len(path.read_text().splitlines()) == 6 + len(table)  # one line per entry
    roles = {}
    assert tuning.read_table(path, roles) == table and roles == {(1, 96, 256, 64): "o"}
    assert [asdict(GemvConfig(**e["config"])) for e in data["entries"]] == [asdict(table[k]) for k in sorted(table)]


def test_bad_tables_are_refused(tmp_path):
    path = tmp_path / "bad.json"
    good = {"m": 1, "n": 8, "k": 128, "group": 128, "config": {"block_n": 8}}
    for bad, match in (([good, good], "twice"), ([{**good, "m": 4}], "bucket"),
                       ([{**good, "config": {"block_n": 48, "num_warps": 2, "mma": True}}], "block_n")):
        path.write_text(json.dumps({"gpu": "x", "written_by": "y", "entries": bad}))
        with pytest.raises(AssertionError, match=match):
            tuning.read_table(path)
    path.write_text(json.dumps({"gpu": "x", "written_by": "y", "entries": [{**good, "config": {"block_n": 8, "bn": 1}}]}))
    with pytest.raises(TypeError):
        tuning.read_table(path)


# The rule's configs run: Triton's interpreter on the CPU (conftest), small shapes with odd N and the widest group.
RUN_CASES = {  # (M, N, K, group, prologue, epilogue)
    "1-row-odd-n-residual": (1, 41, 384, 64, "none", "residual"),
    "1-row-rmsnorm-store": (1, 41, 256, 32, "rmsnorm", "store"),
    "1-row-group-1024": (1, 9, 2048, 1024, "none", "residual"),
    "3-rows-odd-n-residual-split": (3, 41, 512, 64, "none", "residual"),
    "8-rows-silu": (8, 42, 256, 64, "none", "silu"),
}


@pytest.mark.parametrize("case", RUN_CASES)
def test_the_rules_configs_run_in_the_kernel(case):
    pytest.importorskip("triton", reason="triton is not installed: the int4 kernels are not tested")
    from qconv.convert.layout import pack_words
    from qconv.runtime.cuda.kernels.w4_matmul import w4_matmul
    M, N, K, group, pro, epi = RUN_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q = torch.randint(0, 16, (N, K), generator=gen)
    s = (torch.rand(N, K // group, generator=gen) * 0.02 + 0.001).half()
    z = torch.randint(0, 16, (N, K // group), generator=gen)
    W = (q.float() - z.float().repeat_interleave(group, 1)) * s.float().repeat_interleave(group, 1)
    x = torch.randn(M, K, generator=gen)
    nw = torch.rand(K, generator=gen).half() + 0.5
    h = x.half().float()
    if pro == "rmsnorm":  # the fp32 residual in, h = weight * (x * rstd) in fp16
        h = (nw.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).half().float()).half().float()
    y = h @ W.t()
    if epi == "silu":  # rows in gate/up pairs
        y = torch.nn.functional.silu(y[:, 0::2].half().float()) * y[:, 1::2].half().float()
    cfg = config_for(None, M, N, K, group, epi, pro)
    out = (torch.zeros if epi == "residual" else torch.empty)(M, N // 2 if epi == "silu" else N, device=dev,
                                                              dtype=torch.float32 if epi == "residual" else torch.float16)
    xin = (x if pro == "rmsnorm" else x.half()).to(dev)
    w4_matmul(xin, pack_words(q, group).to(dev), s.to(dev), z.to(torch.uint8).to(dev), group, out, prologue=pro,
              norm_weight=nw.to(dev), eps=1e-6, epilogue=epi, config=cfg)
    got = out.float().cpu()
    assert ((got - y).norm() / y.norm()).item() < 5e-3, cfg
