"""Decode speed by KV cache mode on the GPU path (issue 30): one W4A16 model (random weights, a real config) with an
fp16, an online int8 and an online int4 cache (plain, and with the Hadamard rotation and a sink), in one run.

    python3 -m bench.gpu_kv [--config .carry/configs/llama-3-8b.json] [--long 8192] [--rows 32 --context 2048]

Per mode: batch-1 decode steps per second after a ``--long``-token prompt (the prefill excluded), and ``--rows``
distinct sequences of ``--context`` tokens each decoding together (tokens per second of the decode steps alone: the
difference between answers of 1 and 1 + ``--steps`` tokens). One workspace, its config.ini's kv_mode set per mode.
"int4" is plain per-token codes (kv_rotation none); "int4-t" takes the transform convert writes for int4 (Hadamard,
one sink position; no K centers: a random model has no calibration, and centers cost the kernels nothing per key).
Writes bench/results/gpu_kv.json and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

import torch

from bench.common import log, provenance, random_workspace, write_result
from bench.gpu_rows import rand_ids
from qconv.convert.manifest import update_manifest
from qconv.runtime.engine import Engine
from qconv.runtime.generation import GenerationConfig

ROOT = Path(__file__).resolve().parent.parent
MODES = ("fp16", "int8", "int4", "int4-t")


def set_mode(ws: Path, mode: str) -> Path:
    """The workspace with its config.ini's cache set to ``mode`` (the weights are the same for every mode): int4 as
    plain per-token codes (kv_rotation none, as a config.ini from before the transform), int4-t with the Hadamard
    rotation and one sink position."""
    t = mode == "int4-t"
    ini = ws / "config.ini"
    text = re.sub(r"(?m)^kv_mode = .*$", f"kv_mode = {mode.removesuffix('-t')}", ini.read_text())
    text = re.sub(r"(?m)^kv_rotation = .*$", f"kv_rotation = {'hadamard' if t else 'none'}", text)
    ini.write_text(re.sub(r"(?m)^kv_sink = .*$", f"kv_sink = {int(t)}", text))
    update_manifest(ws, "config.ini")
    return ws


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def measure(ws: Path, args) -> dict:
    eng = Engine.from_workspace(ws, device=args.device, verify=False, batch_size=args.rows)
    V = eng.cfg.vocab_size
    r = {"kv_bytes_per_token": eng.cache.nbytes() // (eng.cache.batch * eng.cache.max_len), "gpu_path":
         getattr(eng.runner, "graphs", None) is not None}
    long = rand_ids(args.long, V, 1)
    gen = GenerationConfig(max_new_tokens=args.steps + 1, temperature=0.0, stop_ids=())
    rates = []
    for _ in range(1 + args.runs):
        eng.reset()
        list(eng.generate(long, gen))
        s = eng.last_stats
        rates.append((s.new_tokens - 1) / s.decode_s)
    r[f"bs1_ctx{args.long}_tok_s"] = sorted(rates[1:])[len(rates[1:]) // 2]
    prompts = [rand_ids(args.context, V, 10 + j) for j in range(args.rows)]
    one = GenerationConfig(max_new_tokens=1, temperature=0.0, stop_ids=())
    more = GenerationConfig(max_new_tokens=1 + args.steps, temperature=0.0, stop_ids=())
    eng.generate_batch(prompts, more)  # warm-up: graphs captured
    t1 = min(seconds(lambda: eng.generate_batch(prompts, one)) for _ in range(args.runs))
    tn = min(seconds(lambda: eng.generate_batch(prompts, more)) for _ in range(args.runs))
    r[f"bs{args.rows}_ctx{args.context}_tok_s"] = args.rows * args.steps / (tn - t1)
    log(f"    {r}")
    eng.close()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=".carry/configs/llama-3-8b.json")
    ap.add_argument("--tokenizer", default=".carry/smol-tokenizer", help="any tokenizer: prompts are random ids")
    ap.add_argument("--work", default="/tmp/qconv-gpu-kv")
    ap.add_argument("--long", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to try the script on a tiny config")
    args = ap.parse_args()
    config = json.loads((ROOT / args.config).read_text())
    session = max(args.long, args.context) + args.steps + 8
    res = {**provenance(), "config": args.config, "args": vars(args),
           "device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device,
           "modes": {}}
    t0 = time.perf_counter()
    ws = random_workspace(config, str(ROOT / args.tokenizer), Path(args.work) / "w4", "int4", 128, session, args.rows)
    log(f"  workspace in {time.perf_counter() - t0:.0f}s")
    for mode in MODES:
        res["modes"][mode] = measure(set_mode(ws, mode), args)
        write_result("gpu_kv", res)
    shutil.rmtree(ws, ignore_errors=True)
    keys = [f"bs1_ctx{args.long}_tok_s", f"bs{args.rows}_ctx{args.context}_tok_s"]
    print(f"\n{args.config}, W4A16, {res['device']}\n| KV | bytes/token | " + " | ".join(keys) + " |\n"
          + "|---" * (2 + len(keys)) + "|")
    for mode, r in res["modes"].items():
        print(f"| {mode} | {r['kv_bytes_per_token']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
