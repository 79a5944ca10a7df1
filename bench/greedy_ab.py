"""Greedy answers of one workspace through two qconv trees, each run twice in its own process: equal token for token?

    python3 -m bench.greedy_ab WORKSPACE --other .carry/old [--device cuda] [--runs 2]

Four chat prompts x 48 tokens (one at a time), a follow-up that reuses the cached conversation, and (CUDA) the four
as one batch. Each run is a fresh process with ``import qconv`` pointing at its tree, so both trees read the same
workspace. Prints, for each pair of runs, the first token where each answer differs (None: equal throughout);
writes bench/results/greedy_ab.json (--name: another name).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from itertools import combinations
from pathlib import Path

from bench.common import provenance, write_result

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain what a KV cache is in one paragraph.", "List three prime numbers and add them."]
CHILD = """
import json, sys
from qconv.runtime.engine import Engine
from qconv.runtime.generation import GenerationConfig
ws, device, out, questions = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
eng = Engine.from_workspace(ws, device=device, batch_size=4 if device == "cuda" else 1, verify=False)
gen = GenerationConfig(max_new_tokens=48, temperature=0.0, stop_ids=())
prompts = [eng.render([{"role": "user", "content": q}]) for q in questions]
res = {"single": []}
for p in prompts:
    eng.reset()
    res["single"].append(list(eng.generate(p, gen)))
eng.reset()
first = list(eng.generate(prompts[0], gen))
res["follow_up"] = [list(eng.generate(prompts[0] + first + prompts[1][1:], gen))]
if device == "cuda":
    res["batch"] = eng.generate_batch(prompts, gen)
json.dump(res, open(out, "w"))
"""


def answers(tree: Path, ws: str, device: str) -> dict:
    """One fresh process whose ``qconv`` is ``tree`` -> its answers."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "qconv").symlink_to(tree.resolve())
        out = Path(tmp) / "answers.json"
        env = dict(os.environ, PYTHONPATH=tmp)
        subprocess.run([sys.executable, "-c", CHILD, ws, device, str(out), json.dumps(QUESTIONS)], env=env,
                       cwd=tmp, check=True)
        return json.loads(out.read_text())


def first_differences(a: dict, b: dict) -> dict:
    """{kind: [first differing token index or None, per answer]}."""
    def first(x, y):
        return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
    return {k: [first(x, y) for x, y in zip(a[k], b[k])] for k in a}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace")
    ap.add_argument("--other", required=True, help="a checkout of another qconv commit (its repository root)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--name", default="greedy_ab", help="the result file's name (bench/results/NAME.json)")
    args = ap.parse_args()
    runs = {f"{tag}{i + 1}": answers(tree, args.workspace, args.device)
            for tag, tree in (("this", ROOT), ("other", Path(args.other))) for i in range(args.runs)}
    pairs = {f"{a} vs {b}": first_differences(runs[a], runs[b]) for a, b in combinations(runs, 2)}
    write_result(args.name, {**provenance(), "workspace": args.workspace, "device": args.device,
                               "other": args.other, "first_difference": pairs, "runs": runs})
    for pair, diff in pairs.items():
        print(f"{pair}: " + ", ".join(f"{k} {v}" for k, v in diff.items()))


if __name__ == "__main__":
    main()
