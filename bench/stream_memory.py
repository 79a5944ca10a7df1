"""Host memory of turning a GGUF into the cached HF folder (issue 29): this tree's streaming ``gguf_to_hf``
against another checkout's (ef39c67 dequantizes the whole model into memory first), each in a fresh process
with an empty cache. Peak RSS (VmHWM) above the RSS once torch, transformers and gguf are imported, and wall time.

    git archive ef39c67 | tar -x -C .carry/old
    python3 -m bench.stream_memory --gguf ~/.cache/qconv/fetch/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --other .carry/old

Prints a table last; writes bench/results/stream_memory_<gguf stem>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import log, provenance, write_result

ROOT = Path(__file__).resolve().parent.parent
CONVERT = """
import json, os, sys, time
from pathlib import Path
import torch, transformers, gguf
import importlib
model_io = importlib.import_module(sys.argv[2] + ".convert.model_io")
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
base = status("VmRSS")
t0 = time.perf_counter()
out = model_io.gguf_to_hf(Path(sys.argv[1]))
wall = time.perf_counter() - t0
size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
print("RESULT " + json.dumps({"base_rss": base, "peak_rss": status("VmHWM"), "wall_s": wall, "folder_bytes": size}))
"""


def convert(gguf: Path, tree: Path, package: str) -> dict:
    """gguf_to_hf of ``tree`` (imported as ``package``) in a fresh process with an empty QCONV_CACHE."""
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as link:
        (Path(link) / package).symlink_to(tree.resolve())
        env = {**os.environ, "QCONV_CACHE": cache, "PYTHONPATH": link}
        r = subprocess.run([sys.executable, "-c", CONVERT, str(gguf), package], env=env, capture_output=True,
                           text=True, cwd=link)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"{tree}: the conversion failed:\n{r.stderr[-2000:]}")
    res = json.loads(line[len("RESULT "):])
    res["peak_above_base"] = res["peak_rss"] - res["base_rss"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, type=Path)
    ap.add_argument("--other", type=Path, default=None, help="a checkout of another qconv commit, the peer")
    args = ap.parse_args()
    runs = {"this": convert(args.gguf, ROOT, "qconv")}
    log(f"this tree: {runs['this']}")
    if args.other is not None:
        runs["other"] = convert(args.gguf, args.other, "qconv_other")
        log(f"other: {runs['other']}")
    write_result(f"stream_memory_{args.gguf.stem}", {**provenance(), "gguf": str(args.gguf),
                                                      "gguf_bytes": args.gguf.stat().st_size, "other": str(args.other),
                                                      "runs": runs})
    print(f"\n{args.gguf.name} ({args.gguf.stat().st_size / 2**30:.2f} GiB) -> HF folder\n"
          "| tree | peak RSS above base GiB | base GiB | wall s | folder GiB |\n|---|---|---|---|---|")
    for tag, r in runs.items():
        print(f"| {tag} | {r['peak_above_base'] / 2**30:.2f} | {r['base_rss'] / 2**30:.2f} | {r['wall_s']:.0f} | "
              f"{r['folder_bytes'] / 2**30:.2f} |")


if __name__ == "__main__":
    main()
