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
