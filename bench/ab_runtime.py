"""This tree's GPU runtime against another checkout of qconv, in one process on one GPU: the W4A16 + KV int8 row
of bench.gpu_runtime (bs1 and bs8 decode, TTFT of a 2048-token prompt, decode at 4096 tokens), each measurement
taken by both trees' engines on the same workspace, interleaved, which tree goes first alternating by round.

    git archive ef39c67 | tar -x -C .carry/old
    python3 -m bench.ab_runtime --other .carry/old [--config .carry/configs/qwen2.5-1.5b.json] [--rounds 15]

The other tree is imported as the package ``qconv_other`` (qconv's modules import each other relatively), so both
engines see the same host core, clocks and GPU state; separate processes differ by more than 2% in TTFT, which
the host's kernel launches bound. Prints a table last (medians over the rounds, and this tree / other); writes
bench/results/ab_runtime.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import log, provenance, write_result
from bench.gpu_rows import build_workspaces, rand_ids
from bench.gpu_runtime import Plan
from qconv.runtime.engine import Engine
from qconv.runtime.generation import GenerationConfig

ROOT = Path(__file__).resolve().parent.parent
ROW = "W4A16 + KV int8"


def import_other(tree: Path):
    """``tree`` (a qconv checkout) as the package qconv_other -> its Engine and GenerationConfig."""
    link = Path("/tmp/qconv-ab-other")
    link.mkdir(exist_ok=True)
    (link / "qconv_other").unlink(missing_ok=True)
    (link / "qconv_other").symlink_to(tree.resolve())
    sys.path.insert(0, str(link))
    engine = importlib.import_module("qconv_other.runtime.engine")
    return engine.Engine, importlib.import_module("qconv_other.runtime.generation").GenerationConfig


def older_copy(ws: Path) -> Path:
    """The workspace as a tree from before config.ini's kv_mode key reads it: a sibling folder whose entries link to
    ws's, with config.ini less that line (quant_policy alone says int8-static there, as it did)."""
    old = ws.with_name(ws.name + "-older")
    shutil.rmtree(old, ignore_errors=True)
    old.mkdir()
    for entry in ws.iterdir():
        if entry.name != "config.ini":
            (old / entry.name).symlink_to(entry.resolve())
    lines = (ws / "config.ini").read_text().splitlines(keepends=True)
    (old / "config.ini").write_text("".join(x for x in lines if not x.startswith("kv_mode")))
    return old


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def workloads(eng, gen_cls, plan: Plan) -> dict:
    """metric -> (a function that runs it once, value from its seconds)."""
    V = eng.cfg.vocab_size
    gen = gen_cls(max_new_tokens=plan.new_tokens, temperature=0.0, stop_ids=())
    one = gen_cls(max_new_tokens=1, temperature=0.0, stop_ids=())
    ctx = gen_cls(max_new_tokens=plan.ctx_new, temperature=0.0, stop_ids=())
    prompt, long, ctx_prompt = rand_ids(plan.prompt_len, V, 1), rand_ids(plan.prefill_len, V, 2), \
        rand_ids(plan.ctx_len, V, 3)
    prompts = [rand_ids(plan.prompt_len, V, 10 + j) for j in range(plan.batch)]

    def fresh(p, g):
        eng.reset()
        n = sum(1 for _ in eng.generate(p, g))
        assert n == g.max_new_tokens, n

    def ctx_decode():  # decode steps per second after a 4096-token prompt (the prefill excluded)
        fresh(ctx_prompt, ctx)
        s = eng.last_stats
        return (s.new_tokens - 1) / s.decode_s
    return {
        "decode_tok_s": (lambda: fresh(prompt, gen), lambda t: plan.new_tokens / t),
        f"decode_bs{plan.batch}_tok_s": (lambda: eng.generate_batch(prompts, gen),
                                         lambda t: plan.batch * plan.new_tokens / t),
        "ttft_ms": (lambda: fresh(long, one), lambda t: 1000 * t),
        f"decode_tok_s_ctx{plan.ctx_len}": (ctx_decode, None),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--other", required=True, help="a checkout of another qconv commit (its repository root)")
    ap.add_argument("--config", default=".carry/configs/qwen2.5-1.5b.json")
    ap.add_argument("--tokenizer", default=".carry/smol-tokenizer", help="any tokenizer: prompts are random ids")
    ap.add_argument("--work", default="/tmp/qconv-ab")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    plan = Plan()
    config = json.loads((ROOT / args.config).read_text())
    ws = build_workspaces(config, str(ROOT / args.tokenizer), Path(args.work), plan.session_len, plan.batch,
                          plan.group, "cuda")[ROW]
    OtherEngine, OtherGen = import_other(Path(args.other))
    trees = {"this": workloads(Engine.from_workspace(ws, device="cuda", verify=False, batch_size=plan.batch),
                               GenerationConfig, plan),
             "other": workloads(OtherEngine.from_workspace(older_copy(ws), device="cuda", verify=False,
                                                           batch_size=plan.batch),
                                OtherGen, plan)}
    for tag, w in trees.items():  # compile, capture every graph
        for fn, _ in w.values():
            fn()
            fn()
        log(f"{tag}: warmed up")
    runs: dict[str, dict[str, list[float]]] = {tag: {k: [] for k in trees[tag]} for tag in trees}
    for i in range(args.rounds):
        order = ("this", "other") if i % 2 == 0 else ("other", "this")
        for k in trees["this"]:
            for tag in order:
                fn, value = trees[tag][k]
                if value is None:
                    runs[tag][k].append(fn())
                else:
                    runs[tag][k].append(value(timed(fn)))
        log(f"round {i + 1}: " + ", ".join(f"{k} {runs['this'][k][-1]:.1f}/{runs['other'][k][-1]:.1f}"
                                           for k in runs["this"]))
    med = {tag: {k: statistics.median(v) for k, v in r.items()} for tag, r in runs.items()}
    write_result("ab_runtime", {**provenance(), "device": torch.cuda.get_device_name(0), "other": args.other,
                                "config": args.config, "workspace": ROW, "rounds": args.rounds, "runs": runs,
                                "median": med})
    print(f"\n{ROW}, {args.config}, {torch.cuda.get_device_name(0)}, median of {args.rounds} interleaved rounds\n"
          "| metric | this tree | other | this / other |\n|---|---|---|---|")
    for k in med["this"]:
        print(f"| {k} | {med['this'][k]:.1f} | {med['other'][k]:.1f} | {med['this'][k] / med['other'][k]:.4f} |")


if __name__ == "__main__":
    main()
