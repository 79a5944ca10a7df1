"""AWQ speed on the GPU (issue 3): `qconv awq` against AutoAWQ 0.2.9 on the same model and data.

    python3 -m bench.gpu_awq --config CFG.json --tokenizer DIR [--autoawq] [--samples 128 --seqlen 512]

Random weights (transformers' init) with a real config; w4 g128 zero-point GEMM; C4 windows.
Wall time is the quantization itself (both sides after the model is loaded), peak is
torch.cuda.max_memory_allocated over that span. Prints a table last; writes bench/results/gpu_awq_<name>.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from bench.common import provenance, random_model_folder, stub_datasets, write_result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--autoawq", action="store_true", help="also run AutoAWQ 0.2.9 (must be importable)")
    args = ap.parse_args()
    prov = provenance()
    from qconv.convert.model_io import quiet_transformers
    from qconv.pipelines.awq import AwqRequest, awq
    from qconv.pipelines.calibrate import CalibRequest
    from qconv.pipelines.data import load_texts

    quiet_transformers()
    name = Path(args.config).stem
    tmp = Path(tempfile.mkdtemp(prefix="qconv-awq-"))
    folder = random_model_folder(args.config, args.tokenizer, tmp / "model")
    rows = {}
    torch.cuda.reset_peak_memory_stats()
    dst = awq(str(folder), str(tmp / "work"), AwqRequest(bits=4, group_size=128),
              CalibRequest("c4", args.samples, args.seqlen, 0), device="cuda", dtype="float16", force=True)
    rep = json.loads((dst / "awq.json").read_text())
    rows["qconv"] = {"wall_s": rep["wall_s"], "peak_gib": rep["peak_gpu_bytes"] / 2**30}
    torch.cuda.empty_cache()
    if args.autoawq:
        try:
            stub_datasets()
            from qconv.convert.model_io import load_tokenizer
            from qconv.pipelines.awq_autoawq import run_autoawq
            from qconv.pipelines.data import calib_windows

            ids = calib_windows(load_texts("c4"), load_tokenizer(folder), args.samples, args.seqlen, 0)
            r = run_autoawq(str(folder), tmp / "autoawq", 4, 128, False, ids, force=True, dtype=torch.float16)
            rows["autoawq"] = {"wall_s": r["wall_s"], "peak_gib": r["peak_gpu_bytes"] / 2**30}
        except Exception as e:  # report the peer's failure in the table rather than lose our numbers
            rows["autoawq"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    if "wall_s" in rows.get("autoawq", {}):
        rows["ratio"] = {"autoawq_over_qconv_time": rows["autoawq"]["wall_s"] / rows["qconv"]["wall_s"],
                         "qconv_over_autoawq_peak": rows["qconv"]["peak_gib"] / rows["autoawq"]["peak_gib"]}
    out = write_result(f"gpu_awq_{name}", {**prov, "config": args.config, "samples": args.samples,
                                          "seqlen": args.seqlen, "rows": rows})
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{prov}\n{out}\n| {name} | wall s | peak GiB |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | " + " | ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in v.values()) + " |")


if __name__ == "__main__":
    main()
