"""Decode speed and memory across model sizes (issue 28): random weights in real configs, one size at a time.

    python3 -m bench.gpu_ladder --sizes qwen2.5-0.5b,qwen2.5-7b [--rows fp16,w4,w4kv8]   # < 10 min a call
    python3 -m bench.gpu_ladder --table      # the RESULTS table from every bench/results/gpu_ladder_*.json

Per size the workspaces are written straight from random codes (bench.common.random_workspace: one layer in host
memory, never an fp16 checkpoint), then each row is measured by bench.gpu_rows.measure_row: weight, KV and peak
memory; bs1, bs8 and bs32 decode; TTFT of a 2048-token prompt; decode at 4096 tokens; % of the roofline of the
bytes a step reads. Each engine is closed before the next row; a size's workspaces are deleted after it. A row
whose weights would not fit the GPU (or its workspace the disk) is skipped, saying so. One JSON per size,
gpu_ladder_<size>.json (and $OUT).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

from bench.common import log, provenance, random_workspace, saved
from bench.gpu_rows import kv_params_from_run, measure_row, with_kv_params
from bench.gpu_runtime import Plan, copy_bandwidth, save
from bench.peers import torchao_decode

ROOT = Path(__file__).resolve().parent.parent
SIZES = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3-8b", "qwen3-8b", "qwen2.5-14b", "qwen2.5-32b")
ROWS = {"fp16": ("fp16", False), "w4": ("int4", False), "w4kv8": ("int4", True)}
NAMES = {"fp16": "fp16", "w4": "W4A16", "w4kv8": "W4A16 + KV int8", "torchao": "torchao int4 + torch.compile (peer)"}
PLAN = Plan(batch=32, batches=(8, 32))


def weight_bytes(c: dict, weight_type: str, group: int) -> int:
    """Bytes of a workspace's weights: linears at 2 bytes (fp16) or half a byte plus an fp16 scale and a byte of
    zero point per group (int4); embedding and head in fp16."""
    H, L, I, V = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    D = c.get("head_dim") or H // c["num_attention_heads"]
    linear = L * (H * (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * D
                  + c["num_attention_heads"] * D * H + 3 * H * I)
    per = 2 if weight_type == "fp16" else 0.5 + 3 / group
    return int(linear * per + V * H * 2 * (1 if c.get("tie_word_embeddings") else 2))


def run_size(size: str, rows: list[str], args, bw: float) -> dict:
    config = json.loads((ROOT / args.configs / f"{size}.json").read_text())
    res = {**provenance(), "size": size, "config": config, "plan": asdict(PLAN), "copy_bandwidth": bw,
           "device": torch.cuda.get_device_name(0), "rows": {}}
    work = Path(args.work) / size
    spaces: dict[str, Path] = {}
    for row in rows:
        wt, kv = ROWS[row]
        need = weight_bytes(config, wt, PLAN.group)
        free = torch.cuda.mem_get_info()[0]
        work.mkdir(parents=True, exist_ok=True)
        disk = shutil.disk_usage(work).free
        if need > 0.9 * free or (wt not in spaces and need > 0.9 * disk):
            where = "GPU" if need > 0.9 * free else "disk"
            res["rows"][row] = {"skipped": f"{wt} weights {need / 2**30:.1f} GiB, "
                                           f"{(free if where == 'GPU' else disk) / 2**30:.1f} GiB free on the {where}"}
            log(f"  {size} {NAMES[row]}: skipped ({res['rows'][row]['skipped']})")
            continue
        t0 = time.perf_counter()
        try:
            if wt not in spaces:
                spaces[wt] = random_workspace(config, str(ROOT / args.tokenizer), work / wt, wt, PLAN.group,
                                              PLAN.session_len, PLAN.batch)
            ws = spaces[wt]
            if kv:
                ws = with_kv_params(ws, kv_params_from_run(ws, "cuda", work / "kv_qparams.safetensors"))
            log(f"  {size} {NAMES[row]}: workspace in {time.perf_counter() - t0:.0f}s")
            r = measure_row(ws, PLAN, "cuda", bw)
            r.pop("_engine").close()
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001  (one row's failure is recorded; the others go on)
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        res["rows"][row] = r
        save(res, f"gpu_ladder_{size}")
    shutil.rmtree(work, ignore_errors=True)
    if args.torchao:  # the peer end to end: same config, its own random weights (bench.peers.torchao_decode)
        res["rows"]["torchao"] = torchao_decode(config, PLAN.new_tokens, PLAN.prompt_len)
        log(f"  {size} torchao: {res['rows']['torchao']}")
        save(res, f"gpu_ladder_{size}")
    return res


def table(results: list[dict]) -> str:
    B = [f"decode_bs{b}_tok_s" for b in PLAN.batches]
    lines = ["| size | row | weights GiB | KV cache GiB | buffers GiB | peak GiB (× loaded) | bs1 tok/s | "
             + " | ".join(f"bs{b} tok/s" for b in PLAN.batches) + " | TTFT 2048 ms | % roofline |",
             "|---" * (9 + len(B)) + "|"]
    for res in sorted(results, key=lambda r: SIZES.index(r["size"]) if r["size"] in SIZES else 99):
        for row, r in res["rows"].items():
            cells = [res["size"], NAMES[row]]
            if "skipped" in r or "error" in r:
                lines.append("| " + " | ".join(cells + [r.get("skipped") or r["error"]] + [""] * (6 + len(B))) + " |")
                continue
            f = lambda k, d=1, s=1.0: f"{r[k] / s:.{d}f}" if k in r else "–"  # noqa: E731
            peak = f("peak_bytes", 2, 2**30) + (f" ({r['peak_over_loaded']:.2f}×)" if "peak_over_loaded" in r else "")
            cells += [f("weight_bytes", 2, 2**30), f("kv_cache_bytes", 2, 2**30), f("buffer_bytes", 2, 2**30), peak,
                      f("decode_tok_s")] + [f(k) for k in B] + [f("ttft_ms"), f("pct_roofline")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="qwen2.5-0.5b,qwen2.5-1.5b", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--configs", default=".carry/configs", help="a folder of HF config.json files named SIZE.json")
    ap.add_argument("--tokenizer", default=".carry/smol-tokenizer", help="any tokenizer: prompts are random ids")
    ap.add_argument("--work", default="/tmp/qconv-ladder")
    ap.add_argument("--torchao", action="store_true", help="add torchao int4 + torch.compile bs1 decode per size")
    ap.add_argument("--table", action="store_true", help="print the table of every saved size and exit")
    args = ap.parse_args()
    if args.table:
        print(table(saved("gpu_ladder")))
        return
    rows = args.rows.split(",")
    for r in rows:
        if r not in ROWS:
            ap.error(f"--rows: {r!r} is not one of {', '.join(ROWS)}")
    bw = copy_bandwidth()
    log(f"D2D copy bandwidth {bw / 1e12:.2f} TB/s")
    done = [run_size(size, rows, args, bw) for size in args.sizes.split(",")]
    print("\n" + table(done))


if __name__ == "__main__":
    main()
