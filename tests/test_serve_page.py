"""`qconv serve` as a person meets it: the command line, and the chat page in headless Chromium (SmolLM2)."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from qconv.cli import main

SCREENSHOT = Path(__file__).resolve().parent.parent / "bench" / "serve_page.png"


def chromium_path() -> str | None:
    """Debian's chromium if installed, else Playwright's own download (None: neither)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            path = p.chromium.executable_path
        return path if Path(path).is_file() else None
    except Exception:  # playwright missing or its browser never downloaded: treated as no Chromium
        return None


@pytest.fixture(scope="module")
def smol_serve_ws(tmp_path_factory, smollm2_hf):
    ws = tmp_path_factory.mktemp("serve-smol") / "ws"
    assert main(["convert", "--model", str(smollm2_hf), "--dst-path", str(ws), "--weight-type", "int4",
                 "--group-size", "64", "--session-len", "512", "--max-batch-size", "2"]) == 0
    return ws


def test_chat_page_streams_and_keeps_the_conversation(smol_serve_ws, start_server):
    pytest.importorskip("playwright", reason="the browser test needs playwright (pip install playwright)")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium: apt-get install chromium, or python -m playwright install chromium")
    from playwright.sync_api import sync_playwright

    srv, _ = start_server(smol_serve_ws, dtype="bfloat16")  # int4 through torch's CPU kernel: ~2x faster
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            page.goto(srv.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.startsWith('SmolLM2')")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "40")
            # count the updates of answer bubbles: a streamed answer arrives in many pieces
            page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
                .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")

            def ask(text: str, n: int) -> tuple[str, str]:
                page.fill("#input", text)
                page.press("#input", "Enter")
                page.wait_for_selector(f".msg.assistant:nth-of-type({2 * n + 1})[data-done='1']", timeout=90_000)
                answer = page.locator(".msg.assistant").nth(n - 1)
                return answer.locator(".bubble").inner_text(), answer.locator(".stats").inner_text()

            text, stats = ask("What is the capital of France?", 1)
            assert "Paris" in text, text
            assert re.search(r"\d+ tokens · [\d.]+ tok/s", stats) and float(stats.split("· ")[1].split()[0]) > 0
            assert page.evaluate("window.updates") > 5
            text, _ = ask("And the capital of Germany?", 2)  # "And" needs the conversation so far
            assert "Berlin" in text, text
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT))
            page.click("#clear")
            assert page.locator(".msg").count() == 0
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_runs_until_ctrl_c(tiny_serve_ws, run_cli):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "qconv.cli", "serve", str(tiny_serve_ws), "--port", str(port),
                             "--device", "cpu", "--max-batch-size", "2"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    assert json.load(r)["slots"] == 2
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
        with urllib.request.urlopen(url + "/") as r:
            assert "<title>qconv chat</title>" in r.read().decode()
        code, _, err = run_cli("serve", tiny_serve_ws, "--port", port, "--device", "cpu")  # the port is taken
        assert code == 2 and err.startswith("qconv: error: cannot listen on 127.0.0.1:") and len(err.splitlines()) == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "server stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_bad_input_is_one_line(tiny_serve_ws, tmp_path, run_cli):
    for args, needle in [((tmp_path / "nope",), "does not exist"),
                         ((tiny_serve_ws, "--max-batch-size", 0), "--max-batch-size must be at least 1"),
                         ((tiny_serve_ws, "--max-batch-size", 9), "more than the workspace's max_batch_size 8"),
                         ((tiny_serve_ws, "--max-queue", -1), "--max-queue must be >= 0"),
                         ((tiny_serve_ws, "--port", 70000), "--port must lie in 0..65535")]:
        code, _, err = run_cli("serve", *args, "--device", "cpu")
        assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("qconv: error:"), err
        assert needle in err, err
