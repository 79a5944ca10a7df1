"""SmolLM2-135M quality table (issues 2 and 3), by BENCH_PROTOCOL, in float32 on one device.

    python bench/quality_smollm2.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --wiki wiki.utf8 [--device cuda]

Rows: fp32 reference, RTN, AutoAWQ 0.2.9 (if importable), qconv AWQ (all w4 g64: 576 is not a
multiple of 128), and int8 KV (asym/sym x per-head/per-layer) on top of fp32 and of qconv W4.
AWQ calibration: bundled C4 128 x 512, seed 0; KV calibration 128 x 2048; wiki N=40 windows of 2048.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import provenance, stub_datasets, write_result  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--wiki", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--work", default="/tmp/qconv-quality")
    ap.add_argument("--skip-autoawq", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny calibration, to check the script itself")
    args = ap.parse_args()
    prov = provenance()
    torch.backends.cuda.matmul.allow_tf32 = False  # a float32 reference means float32
    torch.backends.cudnn.allow_tf32 = False
    from qconv.convert.model_io import quiet_transformers
    from qconv.pipelines.awq import AwqRequest, awq
    from qconv.pipelines.awq_autoawq import run_autoawq
    from qconv.pipelines.calibrate import CalibRequest, calibrate
    from qconv.pipelines.data import calib_windows, load_texts
    from qconv.pipelines.eval import eval_model

    quiet_transformers()
    work, dev, N = Path(args.work), args.device, args.windows
    c4_awq = CalibRequest("c4", 4, 128, 0) if args.smoke else CalibRequest("c4", 128, 512, 0)
    c4_kv = CalibRequest("c4", 2, 256, 0) if args.smoke else CalibRequest("c4", 128, 2048, 0)
    rows, timings = [], {}

    def ppl(model, **kv):
        return eval_model(str(model), args.wiki, 2048, N, device=dev, dtype="float32", **kv).ppl

    fp = ppl(args.gguf)
    rows.append(("fp32 (dequantized GGUF)", fp))
    variants = {"rtn": AwqRequest(bits=4, group_size=64, method="rtn"),
                "awq": AwqRequest(bits=4, group_size=64),
                "awq-clip4096": AwqRequest(bits=4, group_size=64, clip_samples=4096)}
    for method, req in variants.items():
        t0 = time.perf_counter()
        ck = awq(args.gguf, str(work / method), req, c4_awq, device=dev, dtype="float32", force=True)
        timings[method] = time.perf_counter() - t0
        rows.append((f"qconv {method.upper()} w4 g64", ppl(ck)))
    if not args.skip_autoawq:
        try:
            stub_datasets()
            from qconv.convert.model_io import load_tokenizer, read_config

            ids = calib_windows(load_texts("c4"), load_tokenizer(read_config(args.gguf)[0]), c4_awq.samples,
                                c4_awq.seqlen, c4_awq.seed)
            r = run_autoawq(args.gguf, work / "autoawq", 4, 64, False, ids, force=True, dtype=torch.float32)
            timings["autoawq"] = r["wall_s"]
            rows.append(("AutoAWQ 0.2.9 w4 g64 (same windows; GEMM, zero point)", ppl(r["checkpoint"])))
        except Exception as e:  # keep our numbers if the peer breaks on this transformers
            rows.append((f"AutoAWQ 0.2.9: failed ({type(e).__name__}: {str(e)[:120]})", float("nan")))
    calibrate(args.gguf, str(work / "kv"), c4_kv, device=dev, dtype="float32", force=True)
    w4 = work / "awq" / "awq_checkpoint"
    for base_name, base in (("fp32", args.gguf), ("qconv W4", w4)):
        for gran in ("head", "layer"):
            for sym in (False, True):
                r = ppl(base, kv_params=str(work / "kv"), kv_sym=sym, kv_granularity=gran)
                rows.append((f"{base_name} + KV int8 {'sym' if sym else 'asym'} per-{gran}", r))
    rtn = dict(rows)["qconv RTN w4 g64"]
    ours = dict(rows)["qconv AWQ w4 g64"]
    summary = {"rtn_gap_closed": (rtn - ours) / (rtn - fp)}
    out = write_result("quality_smollm2", {**prov, "device": dev, "windows": N, "rows": rows, "timings_s": timings,
                                            **summary})
    print(f"\n{prov}\n{out}\n| configuration | wiki ppl (N={N}) | vs fp32 |\n|---|---|---|")
    for name, v in rows:
        print(f"| {name} | {v:.4f} | {100 * (v / fp - 1):+.2f}% |")
    print(f"RTN gap closed by qconv AWQ: {100 * summary['rtn_gap_closed']:.1f}%; times {timings}")


if __name__ == "__main__":
    main()
