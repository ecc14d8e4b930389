"""How long this process has existed, for start-up accounting (`startup_s`, `elapsed_s`).

psutil's `create_time()` is built from the boot time in whole seconds and compared with the wall
clock, so it reads up to a second early and moves with NTP steps (common just after a cloud node
boots). On Linux the process's start in clock ticks since boot (/proc/self/stat, field 22) against
CLOCK_BOOTTIME gives the age to ~10 ms on a clock no one sets; callers then count on
time.monotonic().
"""

from __future__ import annotations

import os
import time


def process_age_s() -> float:
    """Seconds since this process started."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 = 20th after "pid (comm)"
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
