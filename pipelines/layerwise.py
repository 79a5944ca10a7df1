"""Run calibration windows through a model one decoder block at a time.

Only the current block's weights sit on the accelerator; the rest of the model stays on the CPU.
The hidden states of all windows stay on the accelerator when they fit in a quarter of its free
memory, else in pinned CPU memory.
"""
from __future__ import annotations

import itertools

import torch

from ..convert.arch import get_module
from ..convert.model_io import LoadedModel


class Layerwise:
    def __init__(self, lm: LoadedModel, ids: torch.Tensor, device: torch.device, batch_size: int):
        # ids: [N, S]
        self.lm, self.device, self.batch_size = lm, device, batch_size
        self.n, self.seqlen = ids.shape
        model = lm.model
        dtype = next(model.parameters()).dtype
        self.store = device
        if device.type == "cuda":
            per_token = model.config.hidden_size * torch.finfo(dtype).bits // 8
            free, _ = torch.cuda.mem_get_info(device)
            if ids.numel() * per_token > free // 4:
                self.store = torch.device("cpu")
        embed = get_module(model, lm.spec.embed)
        with torch.inference_mode():
            # hidden: list of [b, S, H] batches; the lookup runs on the CPU, so the table never moves
            self.hidden = [self._stash(embed(chunk).to(device)) for chunk in ids.split(batch_size)]
        with on_device(get_module(model, lm.spec.rotary), device) as rotary, torch.inference_mode():
            pos = torch.arange(self.seqlen, device=device)[None]
            # (cos, sin): [1, S, D], shared by every block and batch
            self.position_embeddings = rotary(self.hidden[0][:1].to(device), pos)

    @property
    def tokens(self) -> int:
        return self.n * self.seqlen

    def _stash(self, h: torch.Tensor) -> torch.Tensor:
        if self.store.type == "cpu" and h.device.type == "cuda":
            return h.to("cpu", non_blocking=False).pin_memory()
        return h

    def block_forward(self, layer, h: torch.Tensor) -> torch.Tensor:
        """One block on one batch; causal attention over the whole window (no mask, no cache)."""
        out = layer(h.to(self.device, non_blocking=True), attention_mask=None,
                    position_embeddings=self.position_embeddings, use_cache=False)
        return out[0] if isinstance(out, tuple) else out

    @torch.inference_mode()
    def run_block(self, layer, on_batch=None) -> None:
        """Replace every batch's hidden states with the block's output (the next block's input)."""
        for b, h in enumerate(self.hidden):
            out = self.block_forward(layer, h)
            if on_batch:
                on_batch(h.shape[0] * h.shape[1])
            self.hidden[b] = self._stash(out)


class on_device:
    """Context manager: put a module's tensors on ``device`` for the block, then point them back at
    their CPU storage. With ``writeback`` the device values are copied into that storage first
    (for stages that change weights); without it nothing is copied back at all."""

    def __init__(self, module: torch.nn.Module, device: torch.device, writeback: bool = False):
        self.module, self.device, self.writeback = module, device, writeback
        self.saved: list = []

    def __enter__(self):
        if self.device.type != "cpu":
            tensors = itertools.chain(self.module.parameters(), self.module.buffers())
            self.saved = [(t, t.data) for t in tensors]
            for t, cpu in self.saved:
                t.data = cpu.to(self.device, non_blocking=True)
        return self.module

    def __exit__(self, *exc):
        for t, cpu in self.saved:
            if self.writeback and exc[0] is None:
                cpu.copy_(t.data)
            t.data = cpu
        self.saved = []
