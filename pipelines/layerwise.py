"""Run calibration windows through a model one decoder block at a time.

Only the current block's weights sit on the accelerator (plus the next one, being uploaded on a
side stream while the current one computes: at most two blocks at once). A streamed model
(convert/model_io.LoadedModel) reads each block from disk when its turn comes and drops it after:
host memory holds one block on the CPU, and on CUDA the pinned copies of at most three (the one
computing, the next, and the one after while it is read); a resident model stays on the CPU whole.
The hidden states of all windows (windows x seqlen x hidden in the model dtype: 128 x 2048 x 8192 in fp16 is
4 GiB) stay on the accelerator when they fit in a quarter of its free memory, else in (pinned) host memory when
they fit in half of the host limit (available memory, capped by --max-host-memory; the other half is for the
blocks), else in a file beside the stage's output, written and read back one batch at a time
(``Layerwise.placement`` says which).
"""
from __future__ import annotations

import itertools
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import QconvError
from ..convert.arch import get_module
from ..convert.memory import host_limit
from ..convert.model_io import LoadedModel


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return list(itertools.chain(module.parameters(), module.buffers()))


class on_device:
    """Context manager: put a module's tensors on ``device`` for the block, then point them back at
    their CPU storage. With ``writeback`` the device values are copied into that storage first
    (for stages that change weights); without it nothing is copied back at all."""

    def __init__(self, module: torch.nn.Module, device: torch.device, writeback: bool = False):
        self.module, self.device, self.writeback = module, device, writeback
        self.saved: list = []

    def __enter__(self):
        if self.device.type != "cpu":
            self.saved = [(t, t.data) for t in _tensors(self.module)]
            for t, cpu in self.saved:
                t.data = cpu.to(self.device, non_blocking=True)
        return self.module

    def __exit__(self, *exc):
        for t, cpu in self.saved:
            if self.writeback and exc[0] is None:
                cpu.copy_(t.data)
            t.data = cpu
        self.saved = []


def iter_blocks(lm: LoadedModel, device: torch.device, writeback: bool = False):
    """Yield (index, block) with the block's tensors on ``device``.

    On CUDA, block i+1 is read (streamed models), pinned by a worker thread and uploaded on a side
    stream while block i computes, so transfers hide behind compute; at most two blocks are on the
    device at once. ``writeback`` keeps changed weights only for a resident model.
    """
    layers = lm.layers
    if device.type != "cuda":
        for i in range(len(layers)):
            block = lm.fill_block(i)
            try:
                yield i, block
            finally:
                lm.drop_block(i)
        return
    side = torch.cuda.Stream(device)
    pool = ThreadPoolExecutor(1)

    def pin(i):
        tensors = _tensors(lm.fill_block(i))
        pinned = [t.data.pin_memory() for t in tensors]
        if lm.weights is not None:  # streamed: the pinned copy becomes the block's only host copy
            for t, p in zip(tensors, pinned):
                t.data = p
        return pinned

    def upload(pinned):
        with torch.cuda.stream(side):
            gpu = [p.to(device, non_blocking=True) for p in pinned]
            done = torch.cuda.Event()
            done.record(side)
        return gpu, done

    try:
        nxt = upload(pin(0))
        pending = pool.submit(pin, 1) if len(layers) > 1 else None
        for i, layer in enumerate(layers):
            gpu, done = nxt
            torch.cuda.current_stream(device).wait_event(done)
            tensors = _tensors(layer)
            cpu = [t.data for t in tensors]
            for t, g in zip(tensors, gpu):
                g.record_stream(torch.cuda.current_stream(device))
                t.data = g
            if pending is not None:  # start the next upload; it overlaps this block's compute
                nxt = upload(pending.result())
                pending = pool.submit(pin, i + 2) if i + 2 < len(layers) else None
            try:
                yield i, layer
            finally:
                for t, c in zip(tensors, cpu):
                    if writeback:
                        c.copy_(t.data)
                    t.data = c
                lm.drop_block(i)
    finally:
        pool.shutdown(wait=True)


class Spill:
    """Tensors in a temporary file, one region per key, written and read with pwrite/pread: nothing of them stays
    in memory between a put and a get."""

    def __init__(self, directory: Path | None):
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        fd, self.path = tempfile.mkstemp(prefix=".qconv-hidden-", suffix=".bin", dir=directory)
        self.fd, self.end = fd, 0
        self.where: dict[int, tuple[int, torch.Size, torch.dtype]] = {}

    def put(self, key: int, t: torch.Tensor) -> None:
        raw = t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
        at = self.where.get(key, (None,))[0]
        if at is None or raw.nbytes != self.where[key][1].numel() * self.where[key][2].itemsize:
            at, self.end = self.end, self.end + raw.nbytes
        try:
            if os.pwrite(self.fd, raw.data, at) != raw.nbytes:
                raise OSError("short write")
        except OSError as e:  # disk full: one line, and the run's outputs are not written
            raise QconvError(f"cannot write hidden states to {self.path} ({e}); free disk space there, or "
                             f"calibrate on fewer or shorter windows") from None
        self.where[key] = (at, t.shape, t.dtype)

    def get(self, key: int) -> torch.Tensor:
        at, shape, dtype = self.where[key]
        buf = bytearray(shape.numel() * dtype.itemsize)
        if os.preadv(self.fd, [buf], at) != len(buf):
            raise OSError(f"short read from {self.path}")
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            os.unlink(self.path)
            self.fd = -1

    __del__ = close


class Layerwise:
    def __init__(self, lm: LoadedModel, ids: torch.Tensor, device: torch.device, batch_size: int,
                 spill_dir: Path | None = None, max_host_bytes: int | None = None):
        """ids [N, S]. ``spill_dir``: where hidden states go when host memory is short (None: the temp dir);
        ``max_host_bytes``: the stage's cap on host memory (--max-host-memory; None: what is available)."""
        self.lm, self.device, self.batch_size = lm, device, batch_size
        self.n, self.seqlen = ids.shape
        model = lm.model
        dtype = next(model.parameters()).dtype
        total = ids.numel() * model.config.hidden_size * dtype.itemsize
        self.placement, self.spill = ("device" if device.type == "cuda" else "host"), None
        if device.type == "cuda" and total > torch.cuda.mem_get_info(device)[0] // 4:
            self.placement = "host"
        limit = host_limit(max_host_bytes)
        if self.placement == "host" and limit is not None and total > limit // 2:
            self.placement, self.spill = "disk", Spill(spill_dir)
        with torch.inference_mode():
            # Only the rows of tokens that occur are read and travel: table [U, H] for the U distinct ids.
            uniq, inverse = torch.unique(ids, return_inverse=True)
            table = lm.embed_rows(uniq).to(device)
            # hidden: one [b, S, H] batch per entry (or its key in the spill file)
            self.hidden = [self._stash(b, F.embedding(chunk.to(device), table))
                           for b, chunk in enumerate(inverse.split(batch_size))]
            del table
        with on_device(get_module(model, lm.spec.rotary), device) as rotary, torch.inference_mode():
            pos = torch.arange(self.seqlen, device=device)[None]
            # (cos, sin): [1, S, D], shared by every block and batch
            self.position_embeddings = rotary(self.state(0)[:1].to(device), pos)

    @property
    def tokens(self) -> int:
        return self.n * self.seqlen

    def _stash(self, b: int, h: torch.Tensor):
        if self.placement == "disk":
            self.spill.put(b, h)
            return b
        if self.placement == "host" and h.device.type == "cuda":
            return h.to("cpu", non_blocking=False).pin_memory()
        return h

    def state(self, b: int) -> torch.Tensor:
        """Batch b's hidden states [b, S, H] (read back from the file when spilled)."""
        return self.spill.get(b) if self.placement == "disk" else self.hidden[b]

    def block_forward(self, layer, h: torch.Tensor) -> torch.Tensor:
        """One block on one batch; causal attention over the whole window (no mask, no cache)."""
        out = layer(h.to(self.device, non_blocking=True), attention_mask=None,
                    position_embeddings=self.position_embeddings, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    @torch.inference_mode()
    def run_block(self, layer, on_batch=None) -> None:
        """Replace every batch's hidden states with the block's output (the next block's input)."""
        for b in range(len(self.hidden)):
            h = self.state(b)
            out = self.block_forward(layer, h)
            if on_batch:
                on_batch(h.shape[0] * h.shape[1])
            self.hidden[b] = self._stash(b, out)

    def close(self) -> None:
        """Delete the spill file, if any."""
        if self.spill is not None:
            self.spill.close()
