"""Failures during a run that ds_train has explained itself.

User-input errors are `ConfigError` / `DataError` (exit 2, before any work). A `RunFailure` is a
fault met while training — a lost rank, a checkpoint that could not be written, a non-finite loss
under the stop policy: the CLI prints its message as one line without a traceback and exits 1.
In every case the last complete checkpoint is intact and re-running the same command resumes it.
"""

from __future__ import annotations


class RunFailure(RuntimeError):
    """A fault that stopped the run, described in one line (what, where, what to do)."""
