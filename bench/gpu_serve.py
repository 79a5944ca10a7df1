"""`qconv serve` throughput on the GPU (issue 6): many concurrent streams through the real HTTP server.

    python3 -m bench.gpu_serve [--config CFG.json --tokenizer DIR] [--batch 64 --requests 64]
    python3 -m bench.gpu_serve --smoke          # CPU, tiny model: proves the script end to end

A random-weight model of the config (default qwen2.5-1.5b from .carry/) becomes an fp16 workspace with
max_batch_size = --batch; the server runs in this process (uvicorn in a thread, the scheduler's worker
thread) and stdlib HTTP clients in threads stream /v1/completions. Every request: --prompt-tokens random
token ids, --output-tokens new tokens, greedy, with the API extension ``ignore_eos: true`` so that random
weights never stop early. Measured in one run, after a warm-up request:
  single   one request alone: its decode rate (tokens after the first / time after the first)
  batch    --requests at once: total output tok/s (all answer tokens / wall time from the first send to
           the last finish), time to first token p50/p99, and the median per-request decode rate
Prints a table last; writes bench/results/gpu_serve.json (gpu_serve_smoke.json with --smoke).
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.common import provenance, random_model_folder, write_result

ROOT = Path(__file__).resolve().parent.parent
SMOKE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2)


def stream_one(url: str, body: dict, start: threading.Barrier | None = None) -> dict:
    """One streamed /v1/completions request -> timings (s, from the send) and the usage it reports."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    if start is not None:
        start.wait()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    first = end = None
    usage, finish = None, None
    while True:
        line = r.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            usage = chunk["usage"]
        for c in chunk["choices"]:
            if c["text"] and first is None:
                first = time.perf_counter()
            finish = c["finish_reason"] or finish
        end = time.perf_counter()
    conn.close()
    n = usage["completion_tokens"]
    return {"t0": t0, "ttft_s": first - t0, "end": end, "tokens": n, "finish": finish,
            "decode_tok_s": (n - 1) / max(end - first, 1e-9)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / ".carry/configs/qwen2.5-1.5b.json"))
    ap.add_argument("--tokenizer", default=str(ROOT / ".carry/qwen-tokenizer"))
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 8 requests of 32 + 16 tokens")
    ap.add_argument("--batch", type=int, default=64, help="max batch size (KV-cache rows)")
    ap.add_argument("--requests", type=int, default=64, help="requests sent at once")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--weight-type", default="fp16", help="workspace weights: fp16, int4 (RTN), ...")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--work", default=None, help="folder for the model and workspace [default: a temp dir]")
    args = ap.parse_args()
    for path in (args.config, args.tokenizer):
        if not Path(path).exists():
            sys.exit(f"{path} does not exist; pass --config CFG.json --tokenizer DIR")
    if args.smoke:
        args.batch, args.requests, args.prompt_tokens, args.output_tokens = 8, 8, 32, 16
        args.device = "cpu"
    prov = provenance()
    from qconv.convert.model_io import quiet_transformers
    from qconv.convert.workspace import ConvertRequest, convert_workspace
    from qconv.runtime.serve.server import BackgroundServer, ServeConfig, build

    quiet_transformers()
    work = Path(args.work or tempfile.mkdtemp(prefix="qconv-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    config = args.config
    if args.smoke:  # the same architecture and vocabulary, tiny layers
        raw = {**json.loads(Path(args.config).read_text()), **SMOKE}
        config = str(work / "smoke_config.json")
        Path(config).write_text(json.dumps(raw))
    name = Path(args.config).stem + ("-smoke" if args.smoke else "")
    # [STEP 1]: random-weight model -> workspace with one KV-cache row per concurrent request
    folder = random_model_folder(config, args.tokenizer, work / "model")
    session = args.prompt_tokens + args.output_tokens + 8
    convert_workspace(ConvertRequest(str(folder), str(work / "ws"), weight_type=args.weight_type,
                                     session_len=session, max_batch_size=args.batch, force=True),
                      log=lambda *_: None)
    # [STEP 2]: the server in this process
    app, scheduler = build(work / "ws", ServeConfig(port=0, max_batch_size=args.batch, max_queue=args.requests),
                           device=args.device, dtype=args.dtype, verify=False)
    engine = scheduler.engine
    srv = BackgroundServer(app).start()
    model = engine.cfg.model_name
    gen = torch.Generator().manual_seed(0)
    low, high = 1000, min(engine.cfg.vocab_size, 150000)  # ordinary tokens, no specials

    def body(max_tokens: int) -> dict:
        ids = torch.randint(low, high, (args.prompt_tokens,), generator=gen).tolist()
        return {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}

    try:
        # [STEP 3]: warm-up, then one request alone
        stream_one(srv.url, body(8))
        single = stream_one(srv.url, body(args.output_tokens))
        # [STEP 4]: all requests at once (a barrier releases the client threads together)
        results: list[dict] = [None] * args.requests
        barrier = threading.Barrier(args.requests)
        bodies = [body(args.output_tokens) for _ in range(args.requests)]

        def client(i):
            results[i] = stream_one(srv.url, bodies[i], barrier)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.requests)]
        steps0 = scheduler.stats().steps
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        steps = scheduler.stats().steps - steps0
    finally:
        srv.stop()
        scheduler.stop()
    assert all(r["tokens"] == args.output_tokens and r["finish"] == "length" for r in results), results
    wall = max(r["end"] for r in results) - min(r["t0"] for r in results)
    ttft = sorted(r["ttft_s"] for r in results)

    def pct(xs, q):
        return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]
    row = {
        "model": name, "device": str(engine.device), "dtype": str(engine.ws.dtype).removeprefix("torch."),
        "weight_type": engine.cfg.weight_type, "max_batch": args.batch, "requests": args.requests,
        "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
        "single_decode_tok_s": single["decode_tok_s"], "single_ttft_s": single["ttft_s"],
        "total_output_tok_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
        "per_request_decode_tok_s_p50": statistics.median(r["decode_tok_s"] for r in results),
        "decode_steps": steps,
    }
    out = write_result("gpu_serve_smoke" if args.smoke else "gpu_serve", {**prov, **row})
    print(f"\n{prov}\n{out}")
    print("| model | device | batch x requests | prompt + output | single decode tok/s | total output tok/s "
          "| TTFT p50 / p99 | per-request decode tok/s (p50) |\n|---|---|---|---|---|---|---|---|")
    print(f"| {name} ({row['weight_type']}, {row['dtype']}) | {row['device']} | {args.batch} x {args.requests} | "
          f"{args.prompt_tokens} + {args.output_tokens} | {row['single_decode_tok_s']:.1f} | "
          f"{row['total_output_tok_s']:.1f} | {row['ttft_p50_s']:.3f} s / {row['ttft_p99_s']:.3f} s | "
          f"{row['per_request_decode_tok_s_p50']:.1f} |")


if __name__ == "__main__":
    main()
