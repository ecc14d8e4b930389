"""From shard sets to the micro-batches one rank trains on.

`DataPlan` fixes the global order (order.py) over the configured sources. `rank_positions` is the
single definition of which stream positions a rank takes: its contiguous slice of each global
batch, cut into micro-batches. The DataLoader runs over micro-batch numbers with a map-style
dataset, so workers never duplicate or reorder samples, and each batch carries its step and its
sample ids: the position saved in a checkpoint is that of the batch actually consumed, whatever
the prefetching.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ds_train.data.batch_transfer import UnpackingLoader, pack_batch
from ds_train.data.order import MixtureOrder, SampleOrder, StarvedSource
from ds_train.data.reader import RowReader
from ds_train.data.shard_set import DataError, ShardSet, load_shard_set, parse_sources
from ds_train.data.stream_origin import FRESH, StreamOrigin
from ds_train.distributed.deepspeed_config import BatchLayout
from ds_train.objectives.base import ignore_rows

log = logging.getLogger(__name__)


@dataclass
class DataPlan:
    sources: list[ShardSet]
    weights: list[float]
    order: MixtureOrder
    seed: int

    @property
    def seq_len(self) -> int:
        return self.sources[0].seq_len

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.sources[0].tokenizer.get("sha256")

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s, w in zip(self.sources, self.weights):
            h.update(f"{s.fingerprint}:{w:.6f}|".encode())
        return h.hexdigest()

    @property
    def epoch_size(self) -> int:
        """Rows of all sources together (one epoch of a single source; with weighted sources each
        source has its own epochs, see order.py)."""
        return sum(s.num_rows for s in self.sources)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.order.locate(positions)

    @property
    def filler_token(self) -> int:
        """What replaces an unreadable row (data.skip_corrupt); its labels are ignored anyway."""
        eos = self.sources[0].tokenizer.get("eos_token_id")
        return int(eos) if eos is not None else 0

    def describe(self, source: int, shard: int, row: int) -> str:
        return f"{self.sources[source].shard_uri(shard)} row {row}"

    @property
    def order_settings(self) -> dict:
        """What, besides the seed and the sources, decides the order (a resume must keep it)."""
        first = self.order.orders[0]
        return order_settings(first.shuffle, first.window)

    def state(self, consumed_samples: int) -> dict:
        """The data position as saved in checkpoints: global terms only, no rank count."""
        return {
            "consumed_samples": int(consumed_samples),
            "seed": self.seed,
            "order": self.order_settings,
            "fingerprint": self.fingerprint,
            "seq_len": self.seq_len,
            "tokenizer_sha256": self.tokenizer_sha256,
            "epoch": consumed_samples / max(1, self.epoch_size),
        }


def order_settings(shuffle: bool, window: int) -> dict:
    """data.shuffle and data.shuffle_window as recorded in checkpoints (window 1 unless shuffled)."""
    return {"shuffle": bool(shuffle), "window": int(window) if shuffle else 1}


def build_plan(
    spec,
    *,
    seed: int,
    shuffle: bool,
    window: int,
    shard_sets: list[ShardSet] | None = None,
    evaluation: bool = False,
) -> DataPlan:
    """Plan over `spec` (a data.train/valid value). Pass `shard_sets` to skip reading manifests
    (rank 0 reads them once and broadcasts). `evaluation` (data.valid): sets listed without weights
    are weighted by their rows, so one pass reads every row of every set about once; equal weights
    made a 1-row set half of every evaluation (data audit)."""
    sources = parse_sources(spec)
    sets = shard_sets if shard_sets is not None else [load_shard_set(path) for path, _ in sources]
    if evaluation and len(sources) > 1 and not _weighted(spec):
        sources = [(path, float(max(1, s.num_rows))) for (path, _), s in zip(sources, sets, strict=True)]
    first = sets[0]
    for s in sets[1:]:
        if s.seq_len != first.seq_len:
            raise DataError(
                f"data sources disagree on seq_len: {first.location} has {first.seq_len}, "
                f"{s.location} has {s.seq_len}"
            )
        if s.tokenizer.get("sha256") != first.tokenizer.get("sha256"):
            raise DataError(f"data sources were tokenized differently: {first.location} and {s.location}")
    orders = [SampleOrder(s.rows, seed, shuffle, window, stream=i) for i, s in enumerate(sets)]
    try:
        mixture = MixtureOrder(orders, [w for _, w in sources])
    except StarvedSource as e:
        path, weight = sources[e.index]
        share = weight / sum(w for _, w in sources)
        raise DataError(
            f"data source {path}: weight {weight:g} (a share of {share:.2g}) gets no sample in a mixing "
            f"period of {e.period}: raise it (to a share of about {1 / e.period:g} or more) or drop the source"
        ) from None
    return DataPlan(
        sources=sets,
        weights=[w for _, w in sources],
        order=mixture,
        seed=seed,
    )


def _weighted(spec) -> bool:
    """Whether a data spec gives any weight itself ({path, weight} entries)."""
    return isinstance(spec, list) and any(isinstance(item, dict) and "weight" in item for item in spec)


def load_shard_sets(spec) -> list[ShardSet]:
    return [load_shard_set(path) for path, _ in parse_sources(spec)]


def rank_positions(
    step: int, micro: int, layout: BatchLayout, rank: int, origin: StreamOrigin = FRESH
) -> np.ndarray:
    """Stream positions of micro-batch `micro` of optimizer step `step` on `rank` (`origin`: where
    a resumed attempt's steps count from, stream_origin.py)."""
    here = layout.at(step)  # this step's batch (train.batch_ramp)
    start = origin.position(step, layout.schedule) + rank * here.per_rank + micro * here.micro_batch_size
    return np.arange(start, start + here.micro_batch_size, dtype=np.int64)


def global_batch_positions(step: int, layout: BatchLayout, origin: StreamOrigin = FRESH) -> np.ndarray:
    """Every rank's micro-batches of `step`, in rank order: what the whole job consumes that step."""
    return np.concatenate(
        [
            rank_positions(step, micro, layout, rank, origin)
            for rank in range(layout.data_parallel_size)
            for micro in range(layout.at(step).grad_accum)
        ]
    )


def eval_steps_once(plan: DataPlan, layout: BatchLayout, eval_steps: int, *, is_main: bool = False) -> int:
    """train.eval_steps, capped at one pass over the validation rows: evaluation reads positions
    0, 1, ... of its plan, which wrap into a second epoch past the set's rows and would weigh
    some rows twice (`MicroBatches(limit=plan.epoch_size)` takes the targets out of the rest)."""
    steps = min(eval_steps, max(1, -(-plan.epoch_size // layout.global_batch_size)))
    if steps < eval_steps and is_main:
        log.info(
            "the validation set has %d rows: each evaluation reads them once, in %d step(s) of %d rows, "
            "not train.eval_steps=%d",
            plan.epoch_size,
            steps,
            layout.global_batch_size,
            eval_steps,
        )
    return steps


class MicroBatches(Dataset):
    """Item k is the k-th micro-batch this rank consumes from `start_step` on."""

    def __init__(
        self,
        plan: DataPlan,
        layout: BatchLayout,
        rank: int,
        start_step: int,
        objective,
        cache_dir: str | os.PathLike | None,
        *,
        skip_corrupt: bool = False,
        limit: int | None = None,
        origin: StreamOrigin = FRESH,
    ):
        self.plan, self.layout, self.rank, self.start_step = plan, layout, rank, start_step
        self.origin = origin
        self.objective, self.cache_dir, self.skip_corrupt = objective, cache_dir, skip_corrupt
        self.limit = limit  # positions from here on carry no targets (evaluation reads its rows once)
        self._reader: RowReader | None = None

    def __getitem__(self, k: int) -> dict:
        step, micro = self.layout.micro_batch_at(self.start_step, k)
        positions = rank_positions(step, micro, self.layout, self.rank, self.origin)
        batch = self.batch_at(positions, step)
        if self.limit is not None and positions.max(initial=-1) >= self.limit:
            ignore_rows(batch, torch.from_numpy(positions >= self.limit))
        return batch

    def batch_at(self, positions: np.ndarray, step: int) -> dict:
        if self._reader is None:  # opened in the worker process, after fork
            self._reader = RowReader(self.plan.sources, self.cache_dir, skip_corrupt=self.skip_corrupt)
        source, shard, row = self.plan.locate(positions)
        rows, lost = self._reader.read(source, shard, row)
        n_lost = int(np.count_nonzero(lost)) if self.skip_corrupt else 0  # never lost without the opt-in
        if n_lost:
            rows[lost] = self.plan.filler_token
        batch = self.objective.collate(rows, positions)
        if n_lost:  # data.skip_corrupt: the replacement rows carry no targets
            ignore_rows(batch, torch.from_numpy(lost))
        batch["skipped"] = torch.tensor(n_lost)
        batch["step"] = torch.tensor(step)
        batch["source"] = torch.from_numpy(source)
        batch["shard"] = torch.from_numpy(shard)
        batch["row"] = torch.from_numpy(row)
        return batch


class _Endless(Sampler):
    def __iter__(self) -> Iterator[int]:
        return itertools.count()


class _Finite(Sampler):
    def __init__(self, n: int):
        self.n = n

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def _worker_start(worker_id: int) -> None:
    """A DataLoader worker's set-up, in the worker.

    - The collector: a worker forked during training inherits the trainer's collector switched
      off (train.gc_every, callbacks/garbage_collection.py); it joins no collective, so it gets the
      automatic collector back. The objects frozen before the fork stay frozen: a collection never
      touches (and so never copies) the parent's pages.
    - Preemption signals: Slurm signals every process of a job step, torchrun a rank's whole
      process group. The rank answers SIGTERM/SIGUSR1 by finishing its step and checkpointing
      (callbacks/preemption.py), which may need more micro-batches; a worker killed by the signal
      instead makes torch raise in the rank ("DataLoader worker is killed by signal"), and the
      checkpoint is lost. Ctrl-C at a terminal sends SIGINT to the whole foreground group, and the
      rank answers it the same way (torch's worker loop would leave on its KeyboardInterrupt).
      So a worker ignores SIGUSR1 and SIGINT, and SIGTERM unless its own rank sends it
      (torch and multiprocessing stop workers with SIGTERM: obeyed as before). The sender is only
      known to `sigwaitinfo`, so SIGTERM is blocked and a thread waits for it. Slurm's final SIGKILL
      reaches the workers either way.
    - A rank killed outright (OOM killer, SIGKILL): torch's worker notices and leaves its loop, but
      then waits at exit for its queue's feeder thread, blocked for ever writing a batch into a pipe
      nobody reads (the worker holds the read end too): an orphan holding its memory. A thread
      ends the worker as soon as it has been handed to another parent.
    """
    gc.enable()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    # blocked before any other thread exists: every thread of the worker inherits the mask
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    for watch in (_sigterm_from_rank_only, _exit_when_orphaned):
        threading.Thread(target=watch, args=(parent,), daemon=True, name=watch.__name__).start()


def _sigterm_from_rank_only(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(128 + signal.SIGTERM)  # as dying of it would; the rank asked for it


def _exit_when_orphaned(parent: int, poll_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    os._exit(0)


def make_loader(
    dataset: Dataset, *, num_workers: int, prefetch_factor: int, num_micro_batches: int | None = None
) -> Iterable[dict]:
    """A DataLoader over micro-batch numbers: endless for training, `num_micro_batches` for eval.

    With workers, each batch crosses to this process as one packed tensor (batch_transfer.py).
    Workers are forked explicitly: spawn/forkserver (the default in processes started by
    torch.multiprocessing.spawn, and from Python 3.14 on) would pickle the plan — megabytes for a
    100,000-shard set — into every worker and re-import torch there, seconds before the first batch.
    """
    sampler = _Endless() if num_micro_batches is None else _Finite(num_micro_batches)
    kwargs: dict = {}
    if num_workers > 0:
        kwargs = {
            "prefetch_factor": prefetch_factor,
            "persistent_workers": False,
            "collate_fn": pack_batch,
            "worker_init_fn": _worker_start,
        }
        if "fork" in multiprocessing.get_all_start_methods():
            kwargs["multiprocessing_context"] = "fork"
    loader = DataLoader(
        dataset,
        batch_size=None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        **kwargs,
    )
    return UnpackingLoader(loader) if num_workers > 0 else loader
