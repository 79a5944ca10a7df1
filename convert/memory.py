"""Peak memory of the running process, for each stage's JSON record.

Host: VmHWM from /proc/self/status (the peak resident set), reset at a stage's start by writing 5 to
/proc/self/clear_refs, so a stage run after another in one process reports its own peak. Elsewhere the
process-lifetime ru_maxrss. GPU: torch's peak allocated bytes since the stage's reset.
"""
from __future__ import annotations

import resource
import sys

import torch


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


def check_two_blocks_fit(block_bytes: int, dtype: torch.dtype) -> None:
    """Streaming holds a block being computed and the next being read: refuse a machine without room for two."""
    from .. import QconvError

    avail = available_host_bytes()
    if avail is not None and 2 * block_bytes > avail:
        raise QconvError(f"one decoder block takes {block_bytes / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')} "
                         f"and two must fit in host memory, but {avail / 2**30:.1f} GiB is available; free memory, "
                         f"or pass a smaller --dtype")
