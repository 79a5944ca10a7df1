"""`qconv serve`: load a workspace, start the scheduler's worker thread, run the API with uvicorn.

Torch-free at import (the CLI takes ``SERVE_DEFAULTS`` from here); the engine loads inside ``serve``.
``BackgroundServer`` runs the same app in a daemon thread on a free port, for tests and benchmarks.
"""
from __future__ import annotations

import dataclasses
import socket
import threading
import time
from dataclasses import dataclass

from ... import QconvError


@dataclass(slots=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 23333
    max_batch_size: int | None = None  # None: config.ini's max_batch_size
    max_queue: int = 256               # requests that may wait for a slot; past it, 503
    api_key: str | None = None         # None: no key needed

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise QconvError(f"--port must lie in 0..65535, got {self.port}")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise QconvError(f"--max-batch-size must be at least 1, got {self.max_batch_size}")
        if self.max_queue < 0:
            raise QconvError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.api_key is not None and not self.api_key.strip():
            raise QconvError("--api-key is empty")


SERVE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServeConfig)}


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn; a port in use is a user error, not a traceback from deep in asyncio."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise QconvError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def batch_size(workspace, cfg: ServeConfig) -> int:
    """--max-batch-size, checked against the workspace's max_batch_size (its default), before any load."""
    from ..loader import read_workspace_config

    most = read_workspace_config(workspace).max_batch_size
    batch = cfg.max_batch_size or most
    if batch > most:
        raise QconvError(f"--max-batch-size {batch} is more than the workspace's max_batch_size {most}; "
                         f"convert with a larger --max-batch-size")
    return batch


def build(workspace, cfg: ServeConfig, device: str = "auto", dtype: str = "auto", verify: bool = True,
          head: str = "auto"):
    """Load the workspace and start the scheduler -> (app, scheduler). The caller stops the scheduler.
    ``head``: the output projection's format (runtime/loader.load_workspace)."""
    from .api import create_app
    from ..engine import Engine
    from .scheduler import Scheduler

    batch = batch_size(workspace, cfg)
    engine = Engine.from_workspace(workspace, device=device, dtype=dtype, verify=verify, batch_size=batch, head=head)
    scheduler = Scheduler(engine, batch, cfg.max_queue).start()
    return create_app(scheduler, engine.cfg.model_name, cfg.api_key), scheduler


def serve(workspace, cfg: ServeConfig, device: str = "auto", dtype: str = "auto", verify: bool = True,
          log=print, head: str = "auto") -> None:
    """Serve until Ctrl+C (or SIGTERM)."""
    import uvicorn

    batch_size(workspace, cfg)
    sock = listen_socket(cfg.host, cfg.port)  # before the (slow) load: a busy port fails at once
    t0 = time.perf_counter()
    try:
        app, scheduler = build(workspace, cfg, device, dtype, verify, head)
    except BaseException:
        sock.close()
        raise
    e = scheduler.engine
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    log(f"qconv: {e.cfg.model_name} on {e.device} ({e.cfg.weight_type} weights, "
        f"{e.cfg.kv_mode} KV, {e.kv_bytes_per_token} B/token), {scheduler.max_batch} slots x session_len "
        f"{e.cfg.session_len}, queue {scheduler.max_queue}, loaded in {time.perf_counter() - t0:.1f}s")
    log(f"qconv: chat page http://{host}:{sock.getsockname()[1]}/ , OpenAI API http://{host}:"
        f"{sock.getsockname()[1]}/v1" + (" (Authorization: Bearer KEY)" if cfg.api_key else ""))
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl+C it shut down on; a stopped server is no error
        pass
    finally:
        scheduler.stop()
        sock.close()
    log("qconv: server stopped")


class BackgroundServer:
    """uvicorn serving ``app`` from a daemon thread; ``port=0`` picks a free port.

        with BackgroundServer(app) as srv:
            requests go to srv.url
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = listen_socket(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="qconv-uvicorn")

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
