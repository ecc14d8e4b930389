"""Python's cyclic garbage collector, run at the same steps on every rank (train.gc_every).

A training process tracks ~400k Python objects once torch, transformers and DeepSpeed are loaded
and the model is built, and an automatic full collection walks them all: ~90 ms on this project's
CPU VM (bench/bench_gc.py). It fires when enough objects have survived, at a different moment on
each rank, and the other ranks wait for it at the next collective, so with N ranks the job pays
each rank's pauses. torchtitan (`training.gc_freq`), Megatron (`--manual-gc`) and OLMo-core
(GarbageCollectorCallback) therefore switch the automatic collector off and collect at fixed steps.
Here, in addition, the objects alive at the start are frozen (`gc.freeze`: moved to a generation
no collection walks), which makes even a full collection cheap; young generations are collected
every `gc_every` steps, and a full collection runs inside each checkpoint save, a pause every rank
takes at the same step anyway. Cycles created during training are still freed, only later.
"""

from __future__ import annotations

import gc
from pathlib import Path

from ds_train.train.callbacks.base import Callback


class SyncedGarbageCollection(Callback):
    def __init__(self, every: int):
        self.every = every
        self.was_enabled = True

    def on_train_start(self, trainer) -> None:
        self.was_enabled = gc.isenabled()
        gc.collect()  # start-up's garbage goes now, not frozen with the rest
        gc.freeze()
        gc.disable()

    def on_step_end(self, trainer) -> None:
        if trainer.step % self.every == 0:
            gc.collect(1)  # generations 0 and 1: the step's short-lived cycles, sub-millisecond

    def on_checkpoint_written(self, trainer, directory: Path, step: int) -> None:
        gc.collect()

    def on_train_end(self, trainer) -> None:
        gc.unfreeze()
        if self.was_enabled:
            gc.enable()

    def on_train_error(self, trainer, error: BaseException) -> None:
        self.on_train_end(trainer)  # a caller that goes on in this process (tests, notebooks) gets gc back
