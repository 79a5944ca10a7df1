"""GPU calibration speed (issue 2): `qconv calibrate` against a plain fp16 forward over the same tokens.

    python3 -m bench.gpu_calibrate --config ../shared/configs/qwen2.5-1.5b.json --tokenizer DIR [--samples 128 --seqlen 2048]

Random weights (transformers' init, std 0.02) with a real config; the tokenizer only cuts the C4 text.
Prints a table last and writes bench/results/gpu_calibrate.json.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.common import provenance, random_model_folder, write_result


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke test of this script")
    args = ap.parse_args()
    prov = provenance()
    from transformers import AutoModelForCausalLM

    from qconv.convert.model_io import load_tokenizer, quiet_transformers
    from qconv.pipelines.calibrate import CalibRequest, calibrate
    from qconv.pipelines.data import calib_windows, load_texts

    quiet_transformers()
    tmp = Path(tempfile.mkdtemp(prefix="qconv-bench-"))
    folder = random_model_folder(args.config, args.tokenizer, tmp / "model")
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    # warm the CUDA context, cuBLAS and SDPA once so neither side pays for it
    x = torch.randn(8, 12, 256, 128, device=dev, dtype=dtype)
    torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
    (x[0, 0] @ x[0, 0].T).sum().item()
    del x

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    meta = calibrate(str(folder), str(tmp / "work"), CalibRequest("c4", args.samples, args.seqlen, 0),
                     batch_size=args.batch_size, device=args.device, dtype=str(dtype).removeprefix("torch."),
                     force=True)
    calib_peak = torch.cuda.max_memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.empty_cache()

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(dev)
    ids = calib_windows(load_texts("c4"), load_tokenizer(folder), args.samples, args.seqlen, 0)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    with torch.inference_mode():
        model.model(input_ids=ids[: args.batch_size].to(dev), use_cache=False)  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        for chunk in ids.split(args.batch_size):
            model.model(input_ids=chunk.to(dev), use_cache=False)
        sync(dev)
        plain = time.perf_counter() - t0
    tokens = ids.numel()
    rows = {
        "tokens": tokens,
        "qconv_calibrate_s": meta["wall_s"],
        "qconv_calibrate_tok_s": tokens / meta["wall_s"],
        "plain_fp16_forward_s": plain,
        "plain_fp16_forward_tok_s": tokens / plain,
        "ratio": plain / meta["wall_s"],
        "calibrate_peak_gpu_gib": calib_peak / 2**30,
        "one_layer_gib": layer_bytes / 2**30,
        "hidden_states_gib": tokens * model.config.hidden_size * 2 / 2**30,
        "layers_on_gpu_at_once": 1,
    }
    out = write_result("gpu_calibrate", {**prov, "config": args.config, **rows})
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{prov}\n{out}")
    print("| what | value |\n|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")


if __name__ == "__main__":
    main()
