"""AWQ ablations on one real model: each variant is an AwqRequest override, quantized and scored by wiki ppl.

    python bench/awq_ablation.py --gguf qwen.gguf --wiki wiki.utf8 --group-size 128 --windows 8 \
        --variant sink_tokens=1 --variant sink_tokens=1,clip=0 --variant sink_tokens=0 --name ablation_qwen

Quantization in float32 with TF32 matmuls (as bench/quality.py --tf32); ppl in float32 with TF32 off.
C4 128 x 512, seed 0 (BENCH_PROTOCOL). Prints one table row per variant, last.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ppl_parser, provenance, write_result  # noqa: E402


def parse_variant(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        k, v = item.split("=")
        out[k] = v.lower() in ("1", "true") if k in ("clip", "search_scale", "sym") else int(v)
    return out


def main():
    ap = ppl_parser(group_size=128, windows=8)
    ap.add_argument("--variant", action="append", required=True, help="AwqRequest overrides, e.g. clip=0,sink_tokens=1")
    ap.add_argument("--name", required=True)
    ap.add_argument("--work", default="/tmp/qconv-ablation")
    args = ap.parse_args()
    prov = provenance()
    from qconv.convert.model_io import quiet_transformers
    from qconv.pipelines.awq import AwqRequest, awq
    from qconv.pipelines.calibrate import CalibRequest
    from qconv.pipelines.eval import eval_model

    quiet_transformers()
    rows = []
    for i, text in enumerate(args.variant):
        req = AwqRequest(bits=4, group_size=args.group_size, **parse_variant(text))
        torch.backends.cuda.matmul.allow_tf32 = True
        t0 = time.perf_counter()
        ck = awq(args.gguf, f"{args.work}/{i}", req, CalibRequest("c4", 128, 512, 0), device=args.device,
                 dtype="float32", force=True)
        wall = time.perf_counter() - t0
        torch.backends.cuda.matmul.allow_tf32 = False
        ppl = eval_model(str(ck), args.wiki, 2048, args.windows, device=args.device, dtype="float32").ppl
        rows.append((text, ppl, wall))
        print(f"== {text}: ppl {ppl:.4f} ({wall:.0f} s)", flush=True)
    out = write_result(args.name, {**prov, "windows": args.windows, "group_size": args.group_size, "rows": rows})
    print(f"\n{prov}\n{out}\n| variant | wiki ppl (N={args.windows}) | AWQ s |\n|---|---|---|")
    for text, ppl, wall in rows:
        print(f"| {text} | {ppl:.4f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
