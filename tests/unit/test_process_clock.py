"""process_age_s: a process's age, to start-up accounting's precision (tens of ms, not psutil's second)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO

SLEEP_S = 0.5


def test_a_fresh_process_knows_its_age():
    code = (
        f"import time; time.sleep({SLEEP_S}); t0 = time.monotonic()\n"
        "from ds_train.train.process_clock import process_age_s\n"
        "age = process_age_s(); print(age, time.monotonic() - t0)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    age, import_s = map(float, out.stdout.split())
    # its age covers the interpreter's start, the sleep and the import, and not much more
    assert SLEEP_S + import_s <= age + 0.02  # /proc's start time has 10 ms ticks
    assert age < SLEEP_S + import_s + 3.0
