"""train.gc_every: during training Python's collector runs only at fixed steps (and in saves), so
ranks do not stall each other at random steps; afterwards the process is as it was."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import torch

from ds_train.config import from_dict
from ds_train.train.callbacks.garbage_collection import SyncedGarbageCollection


class _Cycle:
    def __init__(self):
        self.me = self


def test_collects_only_at_its_steps_and_restores_the_collector():
    assert gc.isenabled()
    before = weakref.ref(_Cycle())  # start-up garbage: collected before the freeze, not frozen
    cb, trainer = SyncedGarbageCollection(every=5), SimpleNamespace(step=0)
    try:
        cb.on_train_start(trainer)
        assert before() is None
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        garbage = weakref.ref(_Cycle())
        for _ in range(2000):  # enough allocations that the automatic collector would have run
            _Cycle()
        for step in range(1, 5):
            trainer.step = step
            cb.on_step_end(trainer)
            assert garbage() is not None, f"collected at step {step}"
        trainer.step = 5
        cb.on_step_end(trainer)
        assert garbage() is None  # the step's cycles are freed at the step multiple
        late = weakref.ref(_Cycle())
        cb.on_checkpoint_written(trainer, None, 8)  # a save collects everything
        assert late() is None
    finally:
        cb.on_train_end(trainer)
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_a_failed_run_gives_the_collector_back_too():
    cb, trainer = SyncedGarbageCollection(every=5), SimpleNamespace(step=0)
    cb.on_train_start(trainer)
    try:
        cb.on_train_error(trainer, RuntimeError("a step failed"))
        assert gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        gc.enable()


def test_a_process_that_had_the_collector_off_keeps_it_off():
    gc.disable()
    try:
        cb = SyncedGarbageCollection(every=5)
        cb.on_train_start(SimpleNamespace(step=0))
        cb.on_train_end(SimpleNamespace(step=0))
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()


def _config(**train) -> dict:
    return {
        "run": {"output_dir": "runs/x"},
        "model": {"config": "m.json", "tokenizer": "t"},
        "data": {"train": "shards"},
        "train": {"max_steps": 10, "global_batch_size": 8, "micro_batch_size": 2, **train},
    }


def test_every_rank_gets_it_by_default_and_0_leaves_python_alone():
    from ds_train.train.pretrain import standard_callbacks

    worker = SimpleNamespace(is_main=False, rank=1, world_size=2)
    kinds = [type(cb) for cb in standard_callbacks(from_dict(_config()), worker)]
    assert SyncedGarbageCollection in kinds
    off = standard_callbacks(from_dict(_config(gc_every=0)), worker)
    assert not any(isinstance(cb, SyncedGarbageCollection) for cb in off)


class _CollectorState(torch.utils.data.Dataset):
    def __getitem__(self, index: int) -> dict:
        return {"collector_on": torch.tensor(gc.isenabled())}


def test_loader_workers_forked_during_training_get_their_collector_back():
    from ds_train.data.loader import make_loader

    gc.disable()  # as during training with train.gc_every
    try:
        batches = list(make_loader(_CollectorState(), num_workers=1, prefetch_factor=1, num_micro_batches=2))
    finally:
        gc.enable()
    assert [bool(b["collector_on"]) for b in batches] == [True, True]
