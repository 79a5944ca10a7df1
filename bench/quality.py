"""Quality table of one real model (issues 2 and 3), by BENCH_PROTOCOL: fp32, RTN, AutoAWQ, qconv AWQ, KV int8.

    python3 -m bench.quality --gguf SmolLM2-135M-Instruct.Q4_1.gguf --wiki wiki.utf8 --group-size 64 --windows 40
    python3 -m bench.quality --gguf qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --wiki wiki.utf8 --group-size 128 \
        --windows 8 --steps fp,rtn,awq,kv --name quality_qwen     # then --steps autoawq in a second call

Rows: fp32 reference (the dequantized GGUF), qconv RTN, qconv AWQ, AutoAWQ 0.2.9 (if importable; same
token windows), and int8 KV (asym/sym x per-head/per-layer) on top of fp32 and of qconv W4.
Perplexity is always computed in float32 with TF32 off. Quantization runs in --quant-dtype (float32 by
default; --tf32 lets its matmuls use TF32, which the 1.5B model needs to fit a device call).
AWQ calibration: bundled C4 128 x 512, seed 0; KV calibration 128 x 2048.
Rows accumulate in WORK/rows.json, so steps can run in separate calls; the table printed last holds all.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import provenance, stub_datasets, write_result

STEPS = ("fp", "rtn", "awq", "autoawq", "kv")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--wiki", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {STEPS}")
    ap.add_argument("--quant-dtype", default="float32")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls while quantizing (never in ppl)")
    ap.add_argument("--name", default="quality_smollm2", help="bench/results/NAME.json")
    ap.add_argument("--work", default="/tmp/qconv-quality")
    ap.add_argument("--smoke", action="store_true", help="tiny calibration, to check the script itself")
    args = ap.parse_args()
    steps = args.steps.split(",")
    if unknown := set(steps) - set(STEPS):
        ap.error(f"unknown steps {sorted(unknown)}")
    prov = provenance()
    from qconv.convert.model_io import quiet_transformers
    from qconv.pipelines.awq import AwqRequest, awq
    from qconv.pipelines.calibrate import CalibRequest, calibrate
    from qconv.pipelines.eval import eval_model

    quiet_transformers()
    work, dev, N, g = Path(args.work), args.device, args.windows, args.group_size
    work.mkdir(parents=True, exist_ok=True)
    c4_awq = CalibRequest("c4", 4, 128, 0) if args.smoke else CalibRequest("c4", 128, 512, 0)
    c4_kv = CalibRequest("c4", 2, 256, 0) if args.smoke else CalibRequest("c4", 128, 2048, 0)
    store = work / "rows.json"
    state = json.loads(store.read_text()) if store.is_file() else {"rows": {}, "timings_s": {}}
    rows, timings = state["rows"], state["timings_s"]

    def tf32(on: bool):
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on

    def ppl(model, **kv):
        tf32(False)  # a float32 reference means float32
        return eval_model(str(model), args.wiki, 2048, N, device=dev, dtype="float32", **kv).ppl

    def record(name, value, seconds=None, key=None):
        rows[name] = value
        if seconds is not None:
            timings[key] = seconds
        store.write_text(json.dumps(state, indent=2))
        print(f"== {name}: {value:.4f}", flush=True)

    def quantize(method):
        tf32(args.tf32)
        t0 = time.perf_counter()
        ck = awq(args.gguf, str(work / method), AwqRequest(bits=4, group_size=g, method=method), c4_awq,
                 device=dev, dtype=args.quant_dtype, force=True)
        return ck, time.perf_counter() - t0

    if "fp" in steps:
        record("fp32 (dequantized GGUF)", ppl(args.gguf))
    for method in ("rtn", "awq"):
        if method in steps:
            ck, s = quantize(method)
            record(f"qconv {method.upper()} w4 g{g}", ppl(ck), s, method)
    if "autoawq" in steps:
        name = f"AutoAWQ 0.2.9 w4 g{g} (same windows; GEMM, zero point)"
        try:
            stub_datasets()
            from qconv.convert.model_io import load_tokenizer, read_config
            from qconv.pipelines.awq_autoawq import run_autoawq
            from qconv.pipelines.data import calib_windows, load_texts

            tf32(args.tf32)
            ids = calib_windows(load_texts("c4"), load_tokenizer(read_config(args.gguf)[0]), c4_awq.samples,
                                c4_awq.seqlen, c4_awq.seed)
            r = run_autoawq(args.gguf, work / "autoawq", 4, g, False, ids, force=True,
                            dtype=getattr(torch, args.quant_dtype))
            record(name, ppl(r["checkpoint"]), r["wall_s"], "autoawq")
        except Exception as e:  # keep our numbers if the peer breaks on this transformers
            print(f"AutoAWQ failed: {type(e).__name__}: {e}", flush=True)
            record(f"{name}: failed ({type(e).__name__}: {str(e)[:120]})", float("nan"))
    if "kv" in steps:
        tf32(False)
        calibrate(args.gguf, str(work / "kv"), c4_kv, device=dev, dtype="float32", force=True)
        w4 = work / "awq" / "awq_checkpoint"
        for base_name, base in (("fp32", args.gguf), ("qconv W4", w4)):
            for gran in ("head", "layer"):
                for sym in (False, True):
                    record(f"{base_name} + KV int8 {'sym' if sym else 'asym'} per-{gran}",
                           ppl(base, kv_params=str(work / "kv"), kv_sym=sym, kv_granularity=gran))
    fp = rows.get("fp32 (dequantized GGUF)", float("nan"))
    rtn, ours = rows.get(f"qconv RTN w4 g{g}"), rows.get(f"qconv AWQ w4 g{g}")
    summary = {"rtn_gap_closed": (rtn - ours) / (rtn - fp) if rtn and ours else None}
    auto = [v for k, v in rows.items() if k.startswith("AutoAWQ") and v == v]
    if auto and ours:
        summary["qconv_over_autoawq"] = ours / auto[0]
    out = write_result(args.name, {**prov, "device": dev, "windows": N, "group_size": g,
                                   "quant_dtype": args.quant_dtype, "tf32_while_quantizing": args.tf32,
                                   "rows": list(rows.items()), "timings_s": timings, **summary})
    print(f"\n{prov}\n{out}\n| configuration | wiki ppl (N={N}) | vs fp32 |\n|---|---|---|")
    for name, v in rows.items():
        print(f"| {name} | {v:.4f} | {100 * (v / fp - 1):+.2f}% |")
    print(f"summary {summary}; times {timings}")


if __name__ == "__main__":
    main()
