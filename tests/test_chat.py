"""`qconv chat` on SmolLM2 (int4, round-to-nearest g64): a real terminal through pexpect, pipes, --prompt."""
import os
import subprocess
import sys

import pexpect
import pytest

from qconv.cli import main

# One thread per process: the test and the chat child would otherwise fight over the same cores.
ENV = dict(os.environ, OMP_NUM_THREADS="1")
CHAT = [sys.executable, "-m", "qconv.cli", "chat", "--temperature", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def smol_ws(tmp_path_factory, smollm2_hf):
    ws = tmp_path_factory.mktemp("chat") / "ws"
    assert main(["convert", "--model", str(smollm2_hf), "--dst-path", str(ws), "--weight-type", "int4",
                 "--group-size", "64", "--session-len", "1024"]) == 0
    return ws


def answer(child) -> tuple[str, int]:
    """Wait for the next answer: its text (between 'assistant> ' and the stats line) and the KV-cache use."""
    child.expect("assistant> ")
    child.expect(r"\[\d+ tokens, [\d.]+ tok/s, KV cache (\d+)/1024 tokens")
    text, kv_used = child.before, int(child.match.group(1))
    child.expect("user> ")
    return text.replace("\x1b[0m", "").strip(), kv_used


def test_terminal_session(smol_ws):
    child = pexpect.spawn(CHAT[0], CHAT[1:] + [str(smol_ws), "--max-new-tokens", "200"], env=ENV,
                          encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect("user> ")
        child.sendline("What is the capital of France?")
        text, kv1 = answer(child)
        assert "Paris" in text
        child.sendline("And the capital \\")  # continued on the next line; "And" needs the history
        child.sendline("of Germany?")
        text, kv2 = answer(child)
        assert "Berlin" in text and kv2 > kv1  # the history stays in the cache
        child.sendline("clear")
        child.expect(r"\[history cleared\]")
        child.expect("user> ")
        child.sendline("Write a very long story about a dragon.")
        child.expect("assistant> ")
        child.expect(r"\w+ \w+ \w+")  # it has started answering
        child.sendintr()
        child.expect("interrupted")
        child.expect("user> ")
        child.sendline("stream")
        child.expect(r"\[streaming off\]")
        child.expect("user> ")
        child.sendline("What is the capital of Italy?")
        assert "Rome" in answer(child)[0]
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_end_of_input_exits_cleanly(smol_ws):
    child = pexpect.spawn(CHAT[0], CHAT[1:] + [str(smol_ws)], env=ENV, encoding="utf-8", timeout=60)
    child.expect("user> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_piped_stdin_answers_each_line(smol_ws):
    r = subprocess.run(CHAT + [str(smol_ws), "--max-new-tokens", "40"], input="What is the capital of France?\n",
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "user>" not in r.stdout and "\x1b[" not in r.stdout


def test_prompt_prints_one_answer(smol_ws, run_cli):
    code, out, err = run_cli("chat", smol_ws, "--prompt", "What is the capital of France?", "--temperature", 0,
                             "--max-new-tokens", 40, "--system", "You answer in one short sentence.")
    assert code == 0, err
    assert "Paris" in out and "tok/s" in err


@pytest.fixture(scope="module")
def long_ws(tmp_path_factory, make_tiny):
    """A tiny random llama with room for a 3,000-word paste (the answer is noise; the prompt is what counts)."""
    ws = tmp_path_factory.mktemp("chat-long") / "ws"
    model = make_tiny("llama", max_position_embeddings=8192)
    assert main(["convert", "--model", str(model), "--dst-path", str(ws), "--session-len", "8192"]) == 0
    return ws


def send_drained(child, text: str, chunk: int = 512) -> None:
    """Type ``text`` in pieces, reading the echo in between: a pty holds ~4 KB each way, and a child that
    cannot write its echo stops reading what we send."""
    for i in range(0, len(text), chunk):
        child.send(text[i:i + chunk])
        try:
            while True:
                child.read_nonblocking(1 << 16, timeout=0.05)
        except pexpect.TIMEOUT:
            pass


def prompt_tokens(child) -> int:
    child.expect(r"prompt (\d+) tokens")
    n = int(child.match.group(1))
    child.expect("user> ")
    return n


def test_long_and_multiline_pastes_arrive_whole(long_ws, tiny_tokenizer):
    """A 3,000-word line (past the terminal's 4,095-character canonical limit) and a bracketed multi-line paste
    each reach the model whole: the prompt's token count is that of the full message."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer))
    vocab = "the cat sat on a mat and looked at every bird that flew over the old red barn".split()
    words = [vocab[i % len(vocab)] for i in range(2999)] + ["Summarize."]
    long_line = " ".join(words)
    block = "\n".join(" ".join(words[i:i + 20]) for i in range(0, 200, 20))
    want = [len(tok(tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True,
                                            tokenize=False), add_special_tokens=False)["input_ids"])
            for m in (long_line, block)]
    assert len(long_line) > 4095 and want[0] > 3000 and "\n" in block
    child = pexpect.spawn(CHAT[0], CHAT[1:] + [str(long_ws), "--max-new-tokens", "2"],
                          env={**ENV, "TERM": "xterm"}, encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect("user> ")
        send_drained(child, long_line)
        child.send("\r")
        assert prompt_tokens(child) == want[0]
        child.sendline("clear")
        child.expect("user> ")
        send_drained(child, "\x1b[200~" + block + "\x1b[201~")  # a terminal's bracketed paste
        child.send("\r")
        assert prompt_tokens(child) == want[1]
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
