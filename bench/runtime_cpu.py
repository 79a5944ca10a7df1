"""The bundled runtime on the CPU, SmolLM2-135M (issue 4): quality through the runtime and decode speed.

    python3 -m bench.runtime_cpu --awq W/awq_checkpoint --kv-params W/kv_qparams.safetensors [--windows 40]

Four workspaces: fp16, W4 (the AWQ checkpoint, g64), fp16 + KV int8, W4 + KV int8; wiki ppl through the
runtime (BENCH_PROTOCOL windows). Speed: batch 1, a 32-token prompt, 256 new tokens, greedy, EOS ignored,
median of 3 after a warm-up, against HF transformers' generate in float32 in the same process. Long context
(``--long-prompt``, default 2048; 0 skips it): that many prompt tokens, then 64 new ones: time to first token
and the decode rate of the 63 after it, both medians of 3 after a warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.common import provenance, write_result


def median_time(fn, runs: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def long_context(generate, n_new: int = 64, runs: int = 3) -> tuple[float, float]:
    """(TTFT s, decode tok/s after the first token) of ``generate()``, an iterator of n_new tokens; medians."""
    def once():
        t0 = time.perf_counter()
        it = generate()
        next(it)
        t1 = time.perf_counter()
        n = 1 + sum(1 for _ in it)
        assert n == n_new, n
        return t1 - t0, (n_new - 1) / (time.perf_counter() - t1)
    once()  # warm-up
    ttft, rate = zip(*(once() for _ in range(runs)))
    return statistics.median(ttft), statistics.median(rate)


def hf_stream(hf, ids: torch.Tensor, n_new: int):
    """HF generate token by token (prefill, then one cached step per token), greedy, as an iterator."""
    out = hf(ids, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    yield int(tok)
    for _ in range(n_new - 1):
        out = hf(tok, past_key_values=cache, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        yield int(tok)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--awq", required=True)
    ap.add_argument("--kv-params", required=True)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--work", default="/tmp/qconv-runtime")
    ap.add_argument("--result-name", default="runtime_cpu_smollm2", help="bench/results/NAME.json")
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--long-prompt", type=int, default=2048, help="prompt tokens of the long-context run (0: none)")
    args = ap.parse_args()
    prov = provenance()
    from transformers import AutoModelForCausalLM

    from qconv.convert.model_io import gguf_to_hf, quiet_transformers
    from qconv.convert.workspace import ConvertRequest, convert_workspace
    from qconv.pipelines.fetch import fetch
    from qconv.runtime.engine import Engine
    from qconv.runtime.evaluate import eval_workspace
    from qconv.runtime.generation import GenerationConfig

    quiet_transformers()
    gguf, wiki, work = str(fetch("smollm2")), str(fetch("wiki")), Path(args.work)
    spaces = {
        "fp16": ConvertRequest(gguf, str(work / "fp16"), weight_type="fp16", session_len=2304, force=True),
        "W4A16 (AWQ g64)": ConvertRequest(args.awq, str(work / "w4"), session_len=2304, force=True),
        "fp16 + KV int8": ConvertRequest(gguf, str(work / "fp16kv"), weight_type="fp16", kv_params=args.kv_params,
                                         session_len=2304, force=True),
        "W4A16 + KV int8": ConvertRequest(args.awq, str(work / "w4kv"), kv_params=args.kv_params, session_len=2304,
                                          force=True),
    }
    # (row, workspace, compute dtype): float32 is exact against the dequantized model; bfloat16 routes int4
    # through torch's CPU int4 kernel, which is what `auto` picks for int4 workspaces on the CPU.
    runs = [(name, req.dst, "float32") for name, req in spaces.items()]
    runs += [("W4A16 + KV int8, bf16 compute", spaces["W4A16 + KV int8"].dst, "bfloat16"),
             ("W4A16 + KV int8, --dtype auto (what chat/serve use)", spaces["W4A16 + KV int8"].dst, "auto")]
    rows = {}
    for req in spaces.values():
        convert_workspace(req, log=lambda *_: None)
    for name, dst, dt in runs:
        rows[name] = {"dtype": dt}
        if not args.skip_ppl and dt != "auto":  # eval's auto is float32: the float32 row
            rows[name]["ppl"] = eval_workspace(dst, wiki, 2048, args.windows, device="cpu", dtype=dt).ppl

    gen = GenerationConfig(max_new_tokens=256, temperature=0.0, stop_ids=())
    prompt = list(range(1000, 1032))  # 32 tokens
    long_gen = GenerationConfig(max_new_tokens=64, temperature=0.0, stop_ids=())
    long_prompt = [1000 + (7 * i) % 40000 for i in range(args.long_prompt)]
    for name, dst, dt in runs:
        eng = Engine.from_workspace(dst, device="cpu", dtype=dt)

        def run(eng=eng):
            eng.reset()
            n = sum(1 for _ in eng.generate(prompt, gen))
            assert n == 256
        rows[name]["decode_tok_s"] = 256 / median_time(run)
        if args.long_prompt:
            def gen_long(eng=eng):
                eng.reset()
                return iter(eng.generate(long_prompt, long_gen))
            rows[name]["long_ttft_s"], rows[name]["long_decode_tok_s"] = long_context(gen_long)
        del eng
    hf = AutoModelForCausalLM.from_pretrained(gguf_to_hf(Path(gguf)), dtype=torch.float32)
    ids = torch.tensor([prompt])

    def hf_run():
        out = hf.generate(ids, max_new_tokens=256, min_new_tokens=256, do_sample=False)
        assert out.shape[1] == 32 + 256
    with torch.inference_mode():
        hf_row = rows["HF transformers fp32 generate"] = {"dtype": "float32", "decode_tok_s": 256 / median_time(hf_run)}
        if args.long_prompt:
            hf_row["long_ttft_s"], hf_row["long_decode_tok_s"] = long_context(
                lambda: hf_stream(hf, torch.tensor([long_prompt]), 64))
    base = rows["HF transformers fp32 generate"]["decode_tok_s"]
    for r in rows.values():
        r["vs_hf"] = r["decode_tok_s"] / base
    out = write_result(args.result_name, {**prov, "threads": torch.get_num_threads(), "windows": args.windows,
                                          "long_prompt": args.long_prompt, "rows": rows})
    L = args.long_prompt
    print(f"\n{prov}\n{out}\n| configuration | wiki ppl (N={args.windows}) | decode tok/s | vs HF fp32 "
          f"| TTFT @{L} s | decode tok/s @{L} |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r.get('ppl', float('nan')):.4f} | {r['decode_tok_s']:.1f} | {r['vs_hf']:.2f}x "
              f"| {r.get('long_ttft_s', float('nan')):.2f} | {r.get('long_decode_tok_s', float('nan')):.1f} |")


if __name__ == "__main__":
    main()
