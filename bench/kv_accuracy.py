"""KV cache accuracy on SmolLM2-135M (BENCH_PROTOCOL): wiki N=40 windows of 2048; static int8 (KV calibration
128 x 2048, asym/sym, per head/layer) and the online per-token int8 and int4 modes, all on the same windows. int4
twice: without calibration (Hadamard), and with the K centers of the same calibration (Hadamard, K center, sink).

    python3 -m bench.kv_accuracy [--windows 40] [--samples 128] [--work-dir /tmp/qconv-bench/smollm2-kv]
                                 [--static all|default]   (default: only asym per-head, the others' code unchanged)

Prints a markdown table last and writes bench/results/kv_accuracy_smollm2.json.
"""
from __future__ import annotations

import argparse

from bench.common import provenance, write_result
from qconv.pipelines.calibrate import CalibRequest, calibrate
from qconv.pipelines.eval import eval_model
from qconv.pipelines.fetch import fetch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--work-dir", default="/tmp/qconv-bench/smollm2-kv")
    ap.add_argument("--static", choices=("all", "default"), default="all")
    args = ap.parse_args()
    prov = provenance()
    model, wiki = str(fetch("smollm2")), str(fetch("wiki"))
    calib = calibrate(model, args.work_dir, CalibRequest("c4", args.samples, args.seqlen, 0), device="cpu",
                      dtype="float32")
    rows = []
    ref = eval_model(model, wiki, 2048, args.windows, device="cpu", dtype="float32")
    rows.append({"config": "fp32 (reference)", "ppl": ref.ppl})
    for gran in ("head", "layer") if args.static == "all" else ("head",):
        for sym in (False, True) if args.static == "all" else (False,):
            r = eval_model(model, wiki, 2048, args.windows, kv_params=args.work_dir, kv_sym=sym,
                           kv_granularity=gran, device="cpu", dtype="float32")
            rows.append({"config": f"fp32 + KV int8 {'sym' if sym else 'asym'} per-{gran}", "ppl": r.ppl})
    online = (("int8", None, "int8 online per-token"), ("int4", None, "int4 online per-token, Hadamard"),
              ("int4", args.work_dir, "int4 online per-token, Hadamard + K center + sink"))
    for mode, centers, name in online:  # one asym (scale, zp) per token and head
        r = eval_model(model, wiki, 2048, args.windows, kv_params=centers, device="cpu", dtype="float32",
                       kv_mode=mode)
        rows.append({"config": f"fp32 + KV {name}", "ppl": r.ppl})
    for r in rows:
        r["delta_pct"] = 100 * (r["ppl"] / ref.ppl - 1)
    out = write_result("kv_accuracy_smollm2", {**prov, "windows": args.windows, "calibration": calib,
                                                "rows": rows, "predicted_tokens": ref.tokens})
    print(f"\n{prov}\nwritten to {out}\n")
    print("| configuration | wiki ppl (N=%d) | vs fp32 |" % args.windows)
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['ppl']:.4f} | {r['delta_pct']:+.2f}% |")


if __name__ == "__main__":
    main()
