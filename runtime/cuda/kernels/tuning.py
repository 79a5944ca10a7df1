"""Which int4 kernel config runs a linear: a table per GPU model, shipped as configs/<GPU>.json and written by the
config sweep that measured it (each file's written_by holds its command), plus a rule for shapes without an entry.

    {"gpu": <torch.cuda.get_device_name()>, "written_by": <the sweep's command line>,
     "entries": [{"m": 1, "n": 2048, "k": 1536, "group": 128, "role": "qkv", "config": {GemvConfig's fields}}, ...]}

An entry is keyed by (m, n, k, group): m is the rows bucket (1 for one row, 8 for 2-8, 16 for more), n and k the
weight's [N, K], group its quantization group; ``role`` is a note for readers. Pure Python: importable without
Triton or CUDA (the caller gives the GPU name, torch.cuda.get_device_name()).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

CONFIGS = Path(__file__).with_name("configs")
Key = tuple[int, int, int, int]  # (rows bucket, N, K, group)


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3   # _gemm's pipeline depth
    dot: bool = True      # one row through _gemm (padded to 16) rather than _gemv
    v: int = 2            # _gemv: words per thread-column (one 4v-byte load per row)
    tc: bool = False      # _w4_tc_kernel (weights as the left tensor-core operand) rather than _gemv / _gemm
    gpi: int = 1          # _w4_tc_kernel: groups per step
    xvec: bool = False    # _w4_tc_kernel: x loaded in column order and reordered in registers (else gathered)
    pf: int = 1           # _w4_tc_kernel and mma: how many steps ahead the weights load (1 to 3)
    rows: int = 1         # _gemv: input rows per program (their codes made once)
    maxnreg: int | None = None  # registers per thread at most (ptxas spills above): more programs per SM
    mma: bool = False     # kernels/mma_int4.py (mma.sync, operands straight into registers; Gluon): block_n =
    # 16 * num_warps * (1, 2, 4 or 8), the weights pf groups ahead. Where it cannot run (Triton's interpreter, no
    # Gluon, group != 128, before sm_80) the tensor-core kernel takes the same tile (w4_matmul.mma_fallback)
    fuse_norm: bool = False  # tl.dot kernels: an RMSNorm prologue inside the kernel (rstd of the row first), not
    # a norm kernel before it (GpuLinear.run)

    def __post_init__(self):
        assert self.dot or not (self.tc or self.mma), "tensor-core configs run as the tl.dot kernels do (dot=True)"
        assert not self.mma or self.block_n in [16 * self.num_warps * r for r in (1, 2, 4, 8)], \
            f"mma: block_n {self.block_n} is 16 * num_warps * (1, 2, 4 or 8)"
        assert 1 <= self.pf <= 3, f"pf={self.pf}: the weights load 1 to 3 steps ahead"


def misfit(cfg: GemvConfig, group: int, epilogue: str = "store", prologue: str = "none") -> str | None:
    """Why w4_matmul.w4_matmul cannot run ``cfg`` for this group size and fusion, or None when it can."""
    if cfg.split_k > 1 and not (epilogue == "residual" or (epilogue == "silu" and (cfg.tc or cfg.mma))):
        return "split-K needs the residual epilogue (atomic adds), or SiLU-mul in a tensor-core kernel"
    if not cfg.dot:  # _gemv: C = 32 * num_warps thread-columns, group // 8 // v of them per group
        if prologue == "rmsnorm" and cfg.split_k > 1:
            return "_gemv with RMSNorm: the norm is applied at the end, no split-K"
        wg = group // 8
        if wg % cfg.v or (32 * cfg.num_warps) % (wg // cfg.v):
            return f"v={cfg.v}, num_warps={cfg.num_warps}, group {group}: the threads must tile whole groups"
        if cfg.rows < 1 or cfg.rows & (cfg.rows - 1):
            return f"rows={cfg.rows}: a power of two"
    return None


def rows_bucket(m: int) -> int:
    """The table's m for a call with m rows: 1; 8 for 2 to 8 rows; 16 for more."""
    return 1 if m <= 1 else 8 if m <= 8 else 16


def file_for(gpu: str) -> Path:
    """configs/<the GPU name with each run of other characters than letters and digits as one _>.json."""
    return CONFIGS / (re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_") + ".json")


def read_table(path: Path, roles: dict[Key, str] | None = None) -> dict[Key, GemvConfig]:
    """A table file's entries, each config built (and so validated) here; ``roles`` gets their role notes."""
    data = json.loads(Path(path).read_text())
    table = {}
    for e in data["entries"]:
        key = (int(e["m"]), int(e["n"]), int(e["k"]), int(e["group"]))
        assert key[0] in (1, 8, 16), f"{path}: m={key[0]}, the rows bucket is 1, 8 or 16"
        assert key not in table, f"{path}: {key} twice"
        table[key] = GemvConfig(**e["config"])
        if roles is not None and "role" in e:
            roles[key] = e["role"]
    return table


def write_table(path: Path, gpu: str, table: dict[Key, GemvConfig], written_by: str,
                roles: dict[Key, str] | None = None) -> None:
    """The table as read_table reads it, one entry per line, in key order."""
    roles = roles or {}
    lines = [json.dumps({"m": m, "n": n, "k": k, "group": g, **({"role": roles[key]} if key in roles else {}),
                         "config": asdict(table[key])})
             for key in sorted(table) for m, n, k, g in [key]]
    head = f'{{\n  "gpu": {json.dumps(gpu)},\n  "written_by": {json.dumps(written_by)},\n  "entries": [\n'
    Path(path).write_text(head + ",\n".join("    " + line for line in lines) + "\n  ]\n}\n")


_TABLES: dict[str | None, dict[Key, GemvConfig]] = {}


def table_for(gpu: str | None) -> dict[Key, GemvConfig]:
    """The shipped table of this GPU model, read once; empty for a GPU without one (and for None: no GPU)."""
    if gpu not in _TABLES:
        path = None if gpu is None else file_for(gpu)
        _TABLES[gpu] = read_table(path) if path is not None and path.is_file() else {}
    return _TABLES[gpu]


def lookup(gpu: str | None, m: int, n: int, k: int, group: int) -> GemvConfig | None:
    """The table's config for exactly this shape on this GPU, or None."""
    return table_for(gpu).get((rows_bucket(m), n, k, group))


def rule(m: int, n: int, k: int, group: int, epilogue: str = "store", prologue: str = "none",
         sms: int = 132) -> GemvConfig:
    """A config for a shape without a table entry, from the shape and the SM count alone.

    Group 128 (the mma kernel's), where K may be split (the residual epilogue's atomic adds, or SiLU-mul's sums) or
    the outputs alone make a program per SM: the mma kernel, 128 outputs and 4 warps a program, K split so that
    about four programs run per SM (a slice keeps one group or more); several rows whose outputs already make two
    programs per SM keep K whole (2-8 rows load the weights three groups ahead). Two to eight rows of a matrix
    with fewer outputs take 256 outputs and 8 warps a program, K split for about one program per SM, three groups
    ahead. A one-row matrix too small for two programs per SM even at one group a slice takes 32 outputs and 2 warps
    a program, the weights three groups ahead; one of at most 2^21 weights behind an RMSNorm takes _gemv, which
    applies the norm itself (the mma kernel needs a norm kernel before it).
    Other groups, and outputs too few to fill the SMs unsplit: one row takes _gemv (8 outputs per program, 4 words
    per thread-column where a group holds a multiple of 4, one warp; split-K with the residual epilogue and no
    RMSNorm, doubling while the programs stay within about four per SM and each slice keeps two groups), several
    rows _gemm (tl.dot, 32 outputs per program, 64 when that still gives four programs per SM; the same split-K
    rule at two programs per SM).
    bench/RESULTS.md ("int4 kernels across shapes") has how close this comes to each swept shape's best.
    """
    groups = k // group
    splittable = epilogue in ("residual", "silu")
    n_blocks = -(-n // 128)
    fused_norm = m == 1 and prologue == "rmsnorm" and n * k <= 1 << 21
    if group == 128 and (splittable or n_blocks >= sms) and not fused_norm:
        if splittable and m == 1 and n_blocks * groups < 2 * sms:
            return GemvConfig(32, groups, 2, dot=True, mma=True, pf=3)
        if splittable and 1 < m <= 8 and n_blocks < 2 * sms:
            return GemvConfig(256, max(1, min(groups, round(sms / -(-n // 256)))), 8, dot=True, mma=True, pf=3)
        split = 1
        if splittable and (m == 1 or n_blocks < 2 * sms):
            split = max(1, min(groups, round(4 * sms / n_blocks)))
        return GemvConfig(128, split, 4, dot=True, mma=True, pf=3 if 1 < m <= 8 else 1)
    if m == 1:
        split = 1
        if epilogue == "residual" and prologue != "rmsnorm":
            while -(-n // 8) * split * 2 <= 4 * sms and groups // (split * 2) >= 2:
                split *= 2
        return GemvConfig(8, split, max(1, group // 512), 1, False, 4 if group // 8 % 4 == 0 else 2)
    block_n = 64 if n >= 4 * sms * 64 else 32
    split = 1
    if epilogue == "residual":
        n_blocks = -(-n // block_n)
        while n_blocks * split * 2 <= 2 * sms and groups // (split * 2) >= 2:
            split *= 2
    return GemvConfig(block_n, split)


def config_for(gpu: str | None, m: int, n: int, k: int, group: int, epilogue: str = "store",
               prologue: str = "none", sms: int = 132) -> GemvConfig:
    """The config for m rows times a [n, k] int4 weight of this group size on this GPU (None: no GPU): the table's
    entry when there is one that runs with this epilogue and prologue (a split-K entry serves only the fusions
    that allow split-K), else ``rule``."""
    hit = lookup(gpu, m, n, k, group)
    if hit is not None and misfit(hit, group, epilogue, prologue) is None:
        return hit
    return rule(m, n, k, group, epilogue, prologue, sms)
