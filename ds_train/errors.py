"""Failures during a run that ds_train has explained itself.

User-input errors are `ConfigError` / `DataError` (exit 2, before any work). A `RunFailure` is a
fault met while training — a lost rank, a checkpoint that could not be written, a non-finite loss
under the stop policy: the CLI prints its message as one line without a traceback and exits 1.
In every case the last complete checkpoint is intact and re-running the same command resumes it.
"""

from __future__ import annotations

import os
import sys


class RunFailure(RuntimeError):
    """A fault that stopped the run, described in one line (what, where, what to do).

    `every_rank` marks failures that all ranks raise together from agreed state (a save that
    failed somewhere, a non-finite loss under the stop policy): the process group is still
    healthy, so each rank prints its line and then meets the others before exiting. Without that
    meeting the launcher (torchrun, srun) kills the slower ranks as soon as the first one exits,
    and their explanation is lost."""

    every_rank = False

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.reported = False


def error_line(text: str) -> None:
    """Write `ds-train: error: TEXT` to stderr in one write call. Ranks share the launcher's
    stderr pipe, and `print` writes the text and its newline separately: two ranks failing
    together would interleave as "msg0 msg1\n\n". One write under PIPE_BUF bytes is atomic."""
    sys.stderr.write(f"ds-train: error: {text}\n")
    sys.stderr.flush()


def report_failure(e: RunFailure) -> None:
    """Write the failure as this rank's one line on stderr (once)."""
    if not e.reported:
        error_line(f"[rank {os.environ.get('RANK') or 0}] {e}")
        e.reported = True
