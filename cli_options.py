"""Options that several `qconv` subcommands share, defined once (cli.py uses them)."""
from __future__ import annotations

import click

from .convert.kv_mode import KV_MODES

DEVICES = click.Choice(["auto", "cpu", "cuda"])
DTYPES = click.Choice(["auto", "float16", "bfloat16", "float32"])


def model_option(required=True):
    return click.option("--model", "model", required=required, metavar="PATH",
                        help="HF model folder (config.json + safetensors) or a .gguf file.")


work_dir_option = click.option("--work-dir", required=True, metavar="DIR",
                               help="Folder for statistics and intermediate results (created if missing).")
stats_dir_option = click.option("--work-dir", required=True, metavar="DIR",
                                help="The folder qconv calibrate wrote its statistics into.")
device_option = click.option("--device", type=DEVICES, default="auto", show_default=True,
                             help="auto picks CUDA when present.")
dtype_option = click.option("--dtype", type=DTYPES, default="auto", show_default=True,
                            help="Compute dtype. auto: float32 on CPU; on GPU the checkpoint's bf16, else float16.")
runtime_dtype_option = click.option(
    "--dtype", type=DTYPES, default="auto", show_default=True,
    help="Compute dtype. auto: on CPU bfloat16 for int4 workspaces (torch's CPU int4 kernel), else float32; "
         "on GPU the checkpoint's bf16, else float16.")
force_option = click.option("--force", is_flag=True, help="Recompute and overwrite existing outputs.")
lm_head_option = click.option("--lm-head", type=click.Choice(["auto", "fp", "int8", "int4"]), default="auto",
                              show_default=True, help="Output projection of a workspace: as stored (fp), or "
                              "quantized at load to int8 (one scale per row) or int4 (g128, GPU only). auto: int8 on "
                              "the GPU for int4 workspaces (half the head's bytes per token), else fp.")
trust_option = click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model folder.")
batch_option = click.option("--batch-size", type=click.IntRange(min=1), default=None,
                            help="Windows per forward pass [default: ~16k tokens on GPU, 1 on CPU].")


def calib_options(seqlen_default: int):
    def deco(f):
        for opt in reversed([
            click.option("--calib-dataset", default="c4", show_default=True, metavar="SPEC",
                         help="'c4' (bundled, offline), a .txt/.jsonl/.json/.parquet file, or hf:NAME[:CONFIG]:SPLIT."),
            click.option("--calib-samples", type=click.IntRange(min=1), default=128, show_default=True,
                         help="Number of calibration windows."),
            click.option("--calib-seqlen", type=click.IntRange(min=1), default=seqlen_default, show_default=True,
                         help="Tokens per calibration window."),
            click.option("--seed", type=int, default=0, show_default=True, help="Seed for the document order."),
        ]):
            f = opt(f)
        return f
    return deco


def kv_option(default=None, help_default="fp16, or int8-static with --kv-params"):
    return click.option("--kv", "kv_mode", type=click.Choice(KV_MODES), default=default,
                        help="KV cache: fp16 (unquantized), int8-static (calibrated per-head int8, quant_policy 4), "
                             "int8 / int4 (online: one scale and zero point per token and head, no calibration) "
                             f"[default: {help_default}].")
