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


def run_autoawq(model: str, dst: Path, bits: int, group_size: int, sym: bool, windows, force: bool,
                clone_backup: bool = True, dtype=None, log=print) -> dict:
    """Quantize with AutoAWQ on exactly qconv's calibration windows ([n, S] token ids), so both see
    the same data; returns {"checkpoint", "wall_s" (quantize() alone), "peak_gpu_bytes"}."""
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
    if dtype is None:
        dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    m = AutoAWQForCausalLM.from_pretrained(str(folder), torch_dtype=dtype)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    cfg = {"zero_point": not sym, "q_group_size": group_size, "w_bit": bits, "version": "GEMM"}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    m.quantize(tok, quant_config=cfg, calib_data=windows.tolist(), max_calib_samples=windows.shape[0],
               max_calib_seq_len=windows.shape[1])
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else None
    with atomic_dir(dst, force=force) as tmp:
        m.save_quantized(str(tmp))
        tok.save_pretrained(tmp)
        save_json({"backend": "autoawq", "wall_s": wall, "clone_backup": clone_backup}, tmp / "awq.json")
    log(f"qconv: AutoAWQ done in {wall:.1f}s; checkpoint in {dst}")
    return {"checkpoint": dst, "wall_s": wall, "peak_gpu_bytes": peak}
