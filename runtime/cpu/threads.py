"""How many threads torch's CPU ops run on, chosen before torch loads (torch-free: `qconv` calls it first)."""
from __future__ import annotations

import os
import sys
import time


def pick_cpu_threads() -> None:
    """Pick the CPU thread count before torch loads, unless OMP_NUM_THREADS says it: one thread per core that no
    other process is running on. torch's OpenMP team spins at every op's barrier, so a team with a thread on a
    core that another job holds waits a time slice at each of a decode step's hundreds of ops, and decodes at
    less than half the speed of a team that leaves that core out; on quiet cores more threads are faster.
    Runnable tasks are read from /proc/loadavg (the least of a few samples, so a passing process is ignored)."""
    if "OMP_NUM_THREADS" in os.environ or "torch" in sys.modules:
        return
    try:
        cores = len(os.sched_getaffinity(0))
        samples = []
        for _ in range(5):
            with open("/proc/loadavg") as f:
                samples.append(int(f.read().split()[3].split("/")[0]) - 1)  # runnable now, less this thread
            time.sleep(0.01)
    except (OSError, AttributeError, ValueError, IndexError):  # not Linux: leave torch's default
        return
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores - min(samples)))
