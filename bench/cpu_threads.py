"""`qconv chat --prompt` against `qconv serve` on a CPU shared with busy processes, at qconv's own thread count
and at 1 and 2 threads: answer tokens per second of wall time (prefill included) for one request each.

    python3 -m bench.cpu_threads --workspace work/smollm2-ws [--busy 8] [--tokens 32]

Each configuration runs on a quiet machine (0 busy processes) and with ``--busy`` processes spinning in Python.
Chat's rate is its stats line's (answer tokens / answer time); serve's is completion_tokens over the request's
wall time with ignore_eos, so both count the prefill. Prints a table last; writes bench/results/cpu_threads.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

from bench.common import log, provenance, write_result

PROMPT = "Write a long story about a dragon who learns to bake bread."
CHAT_RATE = re.compile(r"\[(\d+) tokens, ([\d.]+) tok/s")


def env_for(threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def chat_rate(ws: str, tokens: int, threads: int | None) -> float:
    r = subprocess.run([sys.executable, "-m", "qconv.cli", "chat", ws, "--prompt", PROMPT, "--temperature", "0",
                        "--max-new-tokens", str(tokens), "--device", "cpu"], capture_output=True, text=True,
                       env=env_for(threads), timeout=1800)
    m = CHAT_RATE.search(r.stderr)
    if r.returncode != 0 or m is None:
        raise RuntimeError(f"chat failed: {r.stderr[-500:]}")
    return float(m.group(2))


def serve_rate(ws: str, tokens: int, threads: int | None) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "qconv.cli", "serve", ws, "--port", str(port), "--device", "cpu"],
                            env=env_for(threads), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                model = json.load(urllib.request.urlopen(base + "/v1/models", timeout=5))["data"][0]["id"]
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("qconv serve did not start") from None
                time.sleep(0.5)
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens,
                "temperature": 0, "ignore_eos": True}
        req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        t0 = time.perf_counter()
        reply = json.load(urllib.request.urlopen(req, timeout=1800))
        return reply["usage"]["completion_tokens"] / (time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", required=True, help="a workspace from qconv quantize/convert")
    ap.add_argument("--busy", type=int, default=8, help="busy processes for the loaded runs")
    ap.add_argument("--tokens", type=int, default=32, help="answer tokens per request")
    args = ap.parse_args()
    rows = []
    for busy in (0, args.busy):
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            time.sleep(1)
            for label, fn, threads in (("chat", chat_rate, None), ("chat", chat_rate, 1), ("chat", chat_rate, 2),
                                       ("serve", serve_rate, None)):
                rate = fn(args.workspace, args.tokens, threads)
                rows.append({"busy": busy, "command": label, "threads": threads or "qconv's choice", "tok_s": rate})
                log(f"busy {busy}: {label} threads={threads or 'auto'}: {rate:.2f} tok/s")
        finally:
            for p in spinners:
                p.kill()
    write_result("cpu_threads", {**provenance(), "workspace": args.workspace, "tokens": args.tokens, "rows": rows})
    print("\n| busy processes | command | threads | tok/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['busy']} | {r['command']} | {r['threads']} | {r['tok_s']:.2f} |")


if __name__ == "__main__":
    main()
