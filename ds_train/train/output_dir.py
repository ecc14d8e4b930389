"""Whether run.output_dir can hold a run: checked in preflight, before any process group.

Without it a read-only or unwritable location passed --check, and the start failed on every
rank with an OSError traceback at the first write (after DeepSpeed's initialisation).
"""

from __future__ import annotations

import os
from pathlib import Path

from ds_train.config.loader import ConfigError


def check_output_dir(run_dir: Path) -> None:
    """Raise ConfigError (one line) unless `run_dir` is a writable directory or can be created.

    A missing directory is judged by its nearest existing ancestor. `os.access(W_OK)` is used
    because it also reports read-only mounts (EROFS), which mode bits do not show."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.output_dir {run_dir} exists and is not a directory")
    existing = run_dir
    while not existing.exists():
        if existing.parent == existing:  # pragma: no cover - the root always exists
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"run.output_dir {run_dir}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        if existing == run_dir:
            raise ConfigError(
                f"run.output_dir {run_dir} is not writable (read-only file system or permissions)"
            )
        raise ConfigError(
            f"run.output_dir {run_dir} cannot be created: {existing} is not writable "
            "(read-only file system or permissions)"
        )
