"""The real Trainer around stand-ins — an engine whose step sleeps, a constant loss, a loader of
fixed batches — so unit tests exercise the loop's own logic, clocks and hooks without a model or
DeepSpeed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace

import torch

from ds_train.distributed.deepspeed_config import BatchLayout
from ds_train.train.callbacks.base import Callback
from ds_train.train.settings import TrainerSettings
from ds_train.train.trainer import Trainer

MICRO = 2  # micro-batches per step
COMPUTE_S = 0.01  # the stand-in engine's step


class StandInEngine:
    """Its learning rate is 1e-3 × (optimizer steps taken + 1), moved at each step's last micro-batch
    as DeepSpeed's scheduler is."""

    def __init__(self):
        self.micro_steps = 0
        self.training = False  # as from_pretrained leaves a model
        self.modes: list[bool] = []  # the mode of each micro-batch's forward

    def train(self, mode: bool = True):
        self.training = mode

    def eval(self):
        self.training = False

    def backward(self, loss, scale_wrt_gas=True):
        pass

    def step(self):
        time.sleep(COMPUTE_S / MICRO)
        self.micro_steps += 1

    def get_global_grad_norm(self):
        return 1.0

    def get_lr(self):
        return [1e-3 * (self.micro_steps // MICRO + 1)]


class ConstantLoss:
    def loss_sum(self, engine, batch):
        if hasattr(engine, "modes"):
            engine.modes.append(engine.training)
        return torch.tensor(2.0)


class LogRecords(Callback):
    """Keeps the records the trainer logs (on rank 0)."""

    def __init__(self):
        self.records: list[dict] = []

    def on_log(self, trainer, record):
        self.records.append(record)


def stand_in_batches(delay_s: float = 0.0):
    """MICRO batches per step, each after `delay_s` (a slow loader)."""
    step = 0
    while True:
        for _ in range(MICRO):
            time.sleep(delay_s)
            yield {"step": torch.tensor(step), "num_targets": torch.tensor(8)}
        step += 1


def stand_in_trainer(
    callbacks: list[Callback],
    batches: Iterable[dict] | None = None,
    *,
    rank: int = 0,
    world: int = 1,
    max_steps: int = 6,
    log_every: int = 2,
    save_every: int = 0,
    save: Callable[..., None] = lambda *a, **k: None,
    save_async: bool = False,
    checkpoints: object | None = None,
    save_final: bool = True,
    layout: BatchLayout | None = None,
) -> Trainer:
    settings = TrainerSettings(
        max_steps=max_steps,
        log_every=log_every,
        save_every=save_every,
        eval_every=0,
        eval_steps=0,
        seq_len=4,
        save_async=save_async,
        save_final=save_final,
    )
    return Trainer(
        settings=settings,
        ctx=SimpleNamespace(rank=rank, world_size=world, is_main=rank == 0, device=torch.device("cpu")),
        engine=StandInEngine(),
        objective=ConstantLoss(),
        layout=layout or BatchLayout(MICRO * world, 1, MICRO, world),
        train_batches=stand_in_batches() if batches is None else batches,
        checkpoints=checkpoints
        or SimpleNamespace(
            save=save, root=Path("unused"), pending=None, writing=lambda: False, abandon=lambda: None
        ),
        state_fn=lambda step: {},
        config_yaml="",
        callbacks=callbacks,
    )
