"""`qconv chat`: a terminal REPL over ``Engine.chat``.

Commands: ``exit`` (or Ctrl+D), ``clear`` (forget the history), ``stream`` (toggle streaming).
Multi-line input: end a line with ``\\`` to continue it, or wrap a block in lines of ``\"\"\"``.
Ctrl+C stops the current answer (that turn is dropped) and keeps the session. After each answer one
dim line on stderr gives the answer's tokens, tok/s and KV-cache use.
"""
from __future__ import annotations

import contextlib
import re
import signal
import sys
import threading

import click

from .. import QconvError
from .detokenize import TextStream
from .engine import Engine
from .generation import GenerationConfig

COMMANDS = ("exit", "quit", "clear", "stream")


class ChatSession:
    def __init__(self, engine: Engine, gen: GenerationConfig, system: str | None = None,
                 stream: bool = True, interactive: bool = True):
        self.engine, self.gen, self.system = engine, gen, system
        self.stream, self.interactive = stream, interactive
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def ask(self, text: str) -> str | None:
        """Answer ``text`` with the history, printing as it goes; None when Ctrl+C (or an error) stopped it."""
        self.history.append({"role": "user", "content": text})
        pieces: list[str] = []
        try:
            ids, dropped = self.engine.chat_prompt(self.messages(), self.gen.max_new_tokens)
            if dropped:
                _note(f"[the {dropped} oldest messages do not fit session_len {self.engine.cfg.session_len} "
                      f"with the answer; the model sees only the newer ones]")
            if self.interactive:
                click.echo(click.style("assistant> ", fg="cyan", bold=True), nl=False)
            with _ctrl_c_sets() as stop:
                answer = TextStream(self.engine.tokenizer).feed_all(self.engine.generate(ids, self.gen))
                for piece in answer:
                    pieces.append(piece)
                    if self.stream:
                        click.echo(piece, nl=False)
                    if stop.is_set():
                        break
                answer.close()
            if stop.is_set():
                raise KeyboardInterrupt
        except QconvError as e:  # e.g. longer than session_len: in a REPL the session goes on
            self.history.pop()
            if not self.interactive:
                raise
            click.echo("")
            click.echo(click.style(f"qconv: error: {e}", fg="red"), err=True)
            return None
        except KeyboardInterrupt:
            self.history.pop()
            click.echo("")
            _note("[interrupted; this turn is dropped]")
            return None
        text = "".join(pieces)
        click.echo(text if not self.stream else "")
        self.history.append({"role": "assistant", "content": text})
        self._stats()
        return text

    def _stats(self) -> None:
        s = self.engine.last_stats
        if s is None:
            return
        pct = 100.0 * s.kv_used / max(s.kv_capacity, 1)
        _note(f"[{s.new_tokens} tokens, {s.tok_per_s:.1f} tok/s, KV cache {s.kv_used}/{s.kv_capacity} tokens "
              f"({pct:.0f}%), prompt {s.prompt_tokens} tokens, {s.finish}]")

    def clear(self) -> None:
        self.history = []
        self.engine.reset()
        _note("[history cleared]")

    # ------------------------------------------------------------------------------------------
    def read_message(self) -> str | None:
        """One message from stdin (None at EOF); continuation lines and \"\"\" blocks are joined. On a terminal
        a paste arrives whole (readline's bracketed paste), newlines included, and may be longer than the
        terminal's 4095-character line."""
        lines: list[str] = []
        block = False
        while True:
            prompt = "user> " if not lines else "...> "
            try:
                line = input(_readline_prompt(prompt) if self.interactive else "")
            except EOFError:
                if lines:
                    return "\n".join(lines)
                return None
            if line.strip() == '"""':
                if block or lines:
                    return "\n".join(lines)
                block = True
                continue
            if block:
                lines.append(line)
            elif line.endswith("\\"):
                lines.append(line[:-1])
            else:
                lines.append(line)
                return "\n".join(lines)

    def loop(self) -> None:
        if self.interactive:
            _note("commands: exit, clear, stream; a paste may span lines, or end a line with \\ or wrap a block in "
                  "\"\"\" for several; arrow keys edit, up/down recall; Ctrl+C stops an answer")
        while True:
            try:
                text = self.read_message()
            except KeyboardInterrupt:  # at the prompt: drop what was typed, keep the session
                click.echo("")
                continue
            if text is None:  # EOF
                if self.interactive:
                    click.echo("")
                return
            cmd = text.strip()
            if not cmd:
                continue
            if cmd in ("exit", "quit"):
                return
            if cmd == "clear":
                self.clear()
            elif cmd == "stream":
                self.stream = not self.stream
                _note(f"[streaming {'on' if self.stream else 'off'}]")
            else:
                self.ask(text)


def _where(device) -> str:
    import torch

    return f"cpu ({torch.get_num_threads()} threads)" if device.type == "cpu" else str(device)


def _note(text: str) -> None:
    click.echo(click.style(text, dim=True), err=True)


def _line_editing() -> None:
    """On a terminal: readline for input() (arrow keys, history with up/down, Ctrl+R), and bracketed paste, so
    a pasted block is one message, however long and however many lines."""
    try:
        import readline
    except ImportError:  # not on every platform; input() still works, without editing
        return
    readline.parse_and_bind("set enable-bracketed-paste on")


def _readline_prompt(text: str) -> str:
    """A coloured prompt for input(): readline must be told which bytes do not move the cursor (\\001..\\002),
    or editing a long line redraws it in the wrong place."""
    return re.sub(r"(\x1b\[[0-9;]*m)", "\001\\1\002", click.style(text, fg="green", bold=True))


@contextlib.contextmanager
def _ctrl_c_sets():
    """While an answer streams, Ctrl+C sets the event it yields and the answer stops at its next piece. A
    KeyboardInterrupt raised wherever Python happens to check for the signal can be lost (one raised inside a
    __del__ or a GC callback is printed and dropped), so the loop polls a flag instead. Off the main thread,
    where no handler can be set, the default KeyboardInterrupt stays."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def run_chat(engine: Engine, gen: GenerationConfig, system: str | None = None, prompt: str | None = None,
             load_s: float = 0.0, verbose: bool = False) -> None:
    """``prompt``: answer it and return; otherwise a REPL (prompts and colours only on a terminal). ``verbose``:
    first a line on the KV cache (mode, bytes per token with its params, size)."""
    interactive = prompt is None and sys.stdin.isatty()
    if interactive:
        _line_editing()
    session = ChatSession(engine, gen, system, stream=True, interactive=interactive)
    if interactive:
        c = engine.cfg
        click.echo(click.style(f"qconv: {c.model_name}: {c.weight_type} weights, "
                               f"{c.kv_mode} KV cache, session_len {c.session_len}, "
                               f"on {_where(engine.device)}, loaded in {load_s:.1f}s", dim=True), err=True)
    if verbose:
        cache = engine.cache
        _note(f"qconv: KV cache {cache.mode}: {engine.kv_bytes_per_token} bytes per token (params included), "
              f"{cache.batch} x {cache.max_len} tokens = {cache.nbytes() / 2**20:.1f} MiB")
    if prompt is not None:
        if session.ask(prompt) is None:
            raise click.exceptions.Abort()  # Ctrl+C: exit 130 like any interrupted command
    else:
        session.loop()
