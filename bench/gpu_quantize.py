"""`qconv quantize` on models a host would rather not hold (issue 29): per size, an fp16 sharded HF folder of random
weights in a real config is written to disk, then `qconv quantize` runs in its own process (calibrate 128 x 512 C4,
kv-params, AWQ w4 g128, convert) and the stage records give each stage's time, peak host RSS and GPU peak; then the
workspace answers a few greedy tokens on the GPU path.

    python3 -m bench.gpu_quantize --sizes qwen2.5-7b,qwen2.5-14b [--configs .carry/configs] [--keep]

Writes bench/results/gpu_quantize_<size>.json per size and prints a table last (issue 29: peak RSS <= 8 GB and GPU
peak <= 12 GB at 14B, RSS growing < 1.3x from 7B to 14B).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import log, provenance, random_model_folder, saved, write_result

ROOT = Path(__file__).resolve().parent.parent
STAGES = {"calibrate": "work/calibrate.json", "kv-params": "work/kv_qparams.json",
          "awq": "work/awq_checkpoint/awq.json", "convert": "ws/convert.json"}


def run_size(size: str, args) -> dict:
    work = Path(args.work) / size
    shutil.rmtree(work, ignore_errors=True)
    res = {**provenance(), "size": size, "device": args.device}
    t0 = time.perf_counter()
    folder = random_model_folder(str(ROOT / args.configs / f"{size}.json"), str(ROOT / args.tokenizer),
                                 work / "model")
    res["write_model_s"] = time.perf_counter() - t0
    res["model_bytes"] = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cmd = [sys.executable, "-m", "qconv.cli", "quantize", "--model", str(folder), "--dst-path", str(work / "ws"),
           "--work-dir", str(work / "work"), "--calib-samples", str(args.samples), "--calib-seqlen",
           str(args.seqlen), "--device", args.device]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    res["quantize_s"] = time.perf_counter() - t0
    res["returncode"], res["stderr_tail"] = proc.returncode, proc.stderr[-2000:]
    res["stages"] = {}
    for stage, rel in STAGES.items():
        path = work / rel
        if path.is_file():
            rec = json.loads(path.read_text())
            res["stages"][stage] = {k: rec.get(k) for k in ("wall_s", "peak_host_rss_bytes", "peak_gpu_bytes",
                                                            "hidden_states")}
    if proc.returncode == 0:
        from qconv.runtime.engine import Engine
        from qconv.runtime.generation import GenerationConfig
        eng = Engine.from_workspace(work / "ws", device=args.device, verify=False)
        toks = list(eng.generate(list(range(10, 42)), GenerationConfig(max_new_tokens=16, temperature=0.0,
                                                                        stop_ids=())))
        res["decoded_tokens"] = len(toks)
        eng.close()
    write_result(f"gpu_quantize_{size}", res)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return res


def table(results: list[dict]) -> str:
    lines = ["| size | model GB | stage | s | peak host RSS GB | peak GPU GB | hidden states |", "|---" * 7 + "|"]
    for r in results:
        for stage, s in r["stages"].items():
            gb = lambda v: f"{v / 1e9:.2f}" if v else "–"  # noqa: E731
            lines.append(f"| {r['size']} | {r['model_bytes'] / 1e9:.1f} | {stage} | {s['wall_s'] or 0:.1f} | "
                         f"{gb(s['peak_host_rss_bytes'])} | {gb(s['peak_gpu_bytes'])} | "
                         f"{s.get('hidden_states') or ''} |")
        lines.append(f"| {r['size']} | | all (exit {r['returncode']}, decoded {r.get('decoded_tokens', 0)} tokens) | "
                     f"{r['quantize_s']:.1f} | | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="qwen2.5-7b")
    ap.add_argument("--configs", default=".carry/configs")
    ap.add_argument("--tokenizer", default=".carry/smol-tokenizer", help="any tokenizer of the model's vocabulary "
                    "size or smaller (random weights)")
    ap.add_argument("--work", default="/tmp/qconv-quantize")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try the script on a tiny config")
    ap.add_argument("--keep", action="store_true", help="keep the model folder and workspace")
    ap.add_argument("--table", action="store_true", help="print the table of every saved size and exit")
    args = ap.parse_args()
    if args.table:
        print(table(saved("gpu_quantize")))
        return
    done = []
    for size in args.sizes.split(","):
        done.append(run_size(size, args))
        log(table(done[-1:]))
    print("\n" + table(done))


if __name__ == "__main__":
    main()
