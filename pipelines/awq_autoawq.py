"""`qconv awq --backend autoawq`: run AutoAWQ 0.2.9's quantizer on the same data, as the reference peer.

AutoAWQ is an optional, test/bench-only dependency (`pip install --no-deps autoawq==0.2.9`).
On a CPU-resident module its grid search backs weights up with `.cpu()`, which aliases them
(BENCH_PROTOCOL); `clone_backup=True` patches that one line so CPU runs are meaningful.
"""
from __future__ import annotations

import time
from pathlib import Path

from .. import QconvError
from ..convert.fileio import atomic_dir, save_json
from ..convert.model_io import read_config


def run_autoawq(model: str, dst: Path, bits: int, group_size: int, sym: bool, texts: list[str], samples: int,
                seqlen: int, force: bool, clone_backup: bool = True, dtype=None, log=print) -> Path:
    try:
        from awq import AutoAWQForCausalLM
        from awq.quantize import quantizer as aq
    except ImportError:
        raise QconvError("--backend autoawq needs AutoAWQ: pip install --no-deps autoawq==0.2.9 "
                         "(or use the default --backend native)") from None
    import torch

    folder, _, _ = read_config(model)
    if clone_backup:
        src = aq.AwqQuantizer._compute_best_scale
        if not getattr(src, "_qconv_clone", False):
            def patched(self, x, w_mean, x_mean, module2inspect, *a, **kw):
                state = module2inspect.state_dict
                module2inspect.state_dict = lambda *sa, **skw: {k: v.clone() for k, v in state(*sa, **skw).items()}
                try:
                    return src(self, x, w_mean, x_mean, module2inspect, *a, **kw)
                finally:
                    del module2inspect.state_dict
            patched._qconv_clone = True
            aq.AwqQuantizer._compute_best_scale = patched
    t0 = time.perf_counter()
    if dtype is None:
        dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    m = AutoAWQForCausalLM.from_pretrained(str(folder), torch_dtype=dtype)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    cfg = {"zero_point": not sym, "q_group_size": group_size, "w_bit": bits, "version": "GEMM"}
    m.quantize(tok, quant_config=cfg, calib_data=texts, max_calib_samples=samples, max_calib_seq_len=seqlen)
    wall = time.perf_counter() - t0
    with atomic_dir(dst, force=force) as tmp:
        m.save_quantized(str(tmp))
        tok.save_pretrained(tmp)
        save_json({"backend": "autoawq", "wall_s": wall, "clone_backup": clone_backup}, tmp / "awq.json")
    log(f"qconv: AutoAWQ done in {wall:.1f}s; checkpoint in {dst}")
    return dst
