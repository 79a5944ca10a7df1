"""Peak memory of the running process, for each stage's JSON record, and the host memory a stage may plan on.

Host: VmHWM from /proc/self/status (the peak resident set), reset at a stage's start by writing 5 to
/proc/self/clear_refs, so a stage run after another in one process reports its own peak. Elsewhere the
process-lifetime ru_maxrss. GPU: torch's peak allocated bytes since the stage's reset.

Plans (two streamed blocks, where the calibration hidden states go) use ``host_limit``: MemAvailable, capped by
--max-host-memory.
"""
from __future__ import annotations

import resource
import sys

import torch

from .sizes import format_size


def reset_peaks(device: torch.device) -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the record then holds the process's lifetime peak
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_host_rss() -> int:
    """Peak resident set size in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:  123456 kB"
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def peaks(device: torch.device) -> dict:
    return {"peak_host_rss_bytes": peak_host_rss(),
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (memory a new allocation can get without swapping); None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_limit(max_host_bytes: int | None = None) -> int | None:
    """Host memory a stage may plan to hold: what is available, capped by ``max_host_bytes``
    (--max-host-memory); None when neither is known."""
    known = [b for b in (available_host_bytes(), max_host_bytes) if b is not None]
    return min(known) if known else None


def check_two_blocks_fit(block_bytes: int, dtype: torch.dtype, max_host_bytes: int | None = None) -> None:
    """Streaming holds a block being computed and the next being read: refuse a machine (or a --max-host-memory)
    without room for two."""
    from .. import QconvError

    limit = host_limit(max_host_bytes)
    if limit is not None and 2 * block_bytes > limit:
        capped = max_host_bytes is not None and limit == max_host_bytes
        room, fix = (f"--max-host-memory allows {format_size(limit)}", "raise --max-host-memory") if capped else \
            (f"{format_size(limit)} is available", "free memory")
        raise QconvError(f"one decoder block takes {format_size(block_bytes)} in {str(dtype).removeprefix('torch.')} "
                         f"and two must fit in host memory, but {room}; {fix}, or pass a smaller --dtype")
