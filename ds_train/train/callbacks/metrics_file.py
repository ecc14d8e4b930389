"""metrics.jsonl: one JSON object per logged step (and per evaluation), appended across resumes."""

from __future__ import annotations

import json
from pathlib import Path

from ds_train.train.callbacks.base import Callback

METRICS_FILE = "metrics.jsonl"


class MetricsFile(Callback):
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE

    def on_log(self, trainer, record: dict) -> None:
        self._write(record)

    def on_eval(self, trainer, record: dict) -> None:
        self._write(record)

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
