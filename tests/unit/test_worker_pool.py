"""The sharder's worker pool: a worker killed outright (the OOM killer's SIGKILL leaves no
traceback) is one line naming the input it was on, not an anonymous RuntimeError traceback."""

from __future__ import annotations

import os
import signal

import pytest

from ds_train.data.corpus_pieces import CorpusError
from ds_train.data.worker_pool import run_tasks


class _Item:
    def __init__(self, name: str):
        self.name = name

    def describe(self) -> str:
        return f"corpus.jsonl bytes of {self.name}"


def _task(item: _Item, progress=None) -> str:
    if item.name == "huge":
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
    return item.name.upper()


def test_a_worker_killed_outright_is_named_with_its_input():
    assert run_tasks(_task, [_Item("a"), _Item("b")], workers=2) == ["A", "B"]
    with pytest.raises(
        CorpusError,
        match=r"worker died while on corpus.jsonl bytes of huge \(killed by signal 9, e.g. by the kernel's out-of-memory killer",
    ):
        run_tasks(_task, [_Item("a"), _Item("huge"), _Item("c")], workers=2)
