"""qconv's CPU thread choice: one thread per core that no other process runs on, unless OMP_NUM_THREADS says."""
import os
import subprocess
import sys
import time

import pytest

PICK = "import os; from qconv.runtime.cpu.threads import pick_cpu_threads; pick_cpu_threads(); " \
       "print(os.environ.get('OMP_NUM_THREADS'))"


def picked(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", PICK], env=env, capture_output=True, text=True,
                          timeout=60).stdout.strip()


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="reads /proc/loadavg (Linux)")
def test_busy_cores_get_one_thread_and_the_user_setting_wins():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert picked({**env, "OMP_NUM_THREADS": "3"}) == "3"
    cores = len(os.sched_getaffinity(0))
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * cores)]
    try:
        time.sleep(0.5)
        assert picked(env) == "1"  # every core has another runnable process
    finally:
        for p in spinners:
            p.kill()
            p.wait()
