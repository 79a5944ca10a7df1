"""This tree's GPU runtime against another checkout of qconv, side by side on one machine: the W4A16 + KV int8 row
of bench.gpu_runtime (bs1 and bs8 decode, TTFT of a 2048-token prompt, decode at 4096 tokens), measured by each
tree's own bench.gpu_rows.measure_row on the same workspace, alternating trees for ``--rounds`` rounds.

    git archive ef39c67 | tar -x -C .carry/old
    python3 -m bench.ab_runtime --other .carry/old [--config .carry/configs/qwen2.5-1.5b.json] [--rounds 2]

Each measurement runs in a fresh process whose `import qconv` is that tree. Prints a table last (medians over the
rounds, and this tree / other); writes bench/results/ab_runtime.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import log, provenance, write_result
from bench.gpu_rows import build_workspaces
from bench.gpu_runtime import Plan, copy_bandwidth

ROOT = Path(__file__).resolve().parent.parent
ROW = "W4A16 + KV int8"
KEYS = ("decode_tok_s", "decode_bs8_tok_s", "ttft_ms", "decode_tok_s_ctx4096", "graph_step_us")
# Run inside a tree: an old tree's bench scripts are flat modules, a new one's a package.
MEASURE = """
import json, sys
from pathlib import Path
sys.path.insert(0, "bench")
try:
    from bench.gpu_rows import measure_row
    from bench.gpu_runtime import Plan
except ImportError:
    from gpu_rows import measure_row
    from gpu_runtime import Plan
r = measure_row(Path(sys.argv[1]), Plan(), "cuda", float(sys.argv[2]))
r.pop("_engine", None)
print("RESULT " + json.dumps(r, default=str))
"""


def measure(tree: Path, ws: Path, bw: float, tag: str) -> dict:
    """measure_row of ``tree`` in a fresh process whose qconv package is that tree."""
    link = Path(f"/tmp/qconv-ab-{tag}")
    link.mkdir(exist_ok=True)
    (link / "qconv").unlink(missing_ok=True)
    (link / "qconv").symlink_to(tree.resolve())
    env = {**os.environ, "PYTHONPATH": str(link)}
    r = subprocess.run([sys.executable, "-c", MEASURE, str(ws), str(bw)], cwd=tree, env=env, capture_output=True,
                       text=True, timeout=900)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"{tag}: {r.stderr[-1500:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--other", required=True, help="a checkout of another qconv commit (its repository root)")
    ap.add_argument("--config", default=".carry/configs/qwen2.5-1.5b.json")
    ap.add_argument("--tokenizer", default=".carry/smol-tokenizer", help="any tokenizer: prompts are random ids")
    ap.add_argument("--work", default="/tmp/qconv-ab")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    plan = Plan()
    config = json.loads((ROOT / args.config).read_text())
    spaces = build_workspaces(config, str(ROOT / args.tokenizer), Path(args.work), plan.session_len, plan.batch,
                              plan.group, "cuda")
    bw = copy_bandwidth()
    log(f"D2D copy bandwidth {bw / 1e12:.2f} TB/s")
    runs: dict[str, list[dict]] = {"this": [], "other": []}
    for i in range(args.rounds):
        for tag, tree in (("this", ROOT), ("other", Path(args.other))):
            r = measure(tree, spaces[ROW], bw, tag)
            runs[tag].append(r)
            log(f"round {i + 1} {tag}: " + ", ".join(f"{k} {r.get(k, float('nan')):.1f}" for k in KEYS))
    med = {tag: {k: statistics.median(r[k] for r in rs if k in r) for k in KEYS if all(k in r for r in rs)}
           for tag, rs in runs.items()}
    write_result("ab_runtime", {**provenance(), "device": torch.cuda.get_device_name(0), "other": args.other,
                                "config": args.config, "copy_bandwidth": bw, "runs": runs, "median": med})
    print(f"\n{ROW}, {args.config}, median of {args.rounds} rounds\n| metric | this tree | other | this / other |"
          "\n|---|---|---|---|")
    for k in med["this"]:
        print(f"| {k} | {med['this'][k]:.1f} | {med['other'][k]:.1f} | {med['this'][k] / med['other'][k]:.4f} |")


if __name__ == "__main__":
    main()
