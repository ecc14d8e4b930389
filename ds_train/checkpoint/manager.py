"""Save and load training checkpoints through the DeepSpeed engine (see layout.py for the format)."""

from __future__ import annotations

import contextlib
import errno
import heapq
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ds_train.checkpoint.background import BackgroundWriter, HostMemory
from ds_train.checkpoint.deepspeed_io import hashed_writes, is_plain_torch_writer, safe_loading
from ds_train.checkpoint.integrity import CheckpointDamaged, damaged_message, digest, manifest_problems
from ds_train.checkpoint.layout import (
    CONFIG_FILE,
    LATEST,
    PARTIAL_SUFFIX,
    STATE_FILE,
    UNIVERSAL_SUFFIX,
    CheckpointRef,
    checkpoints_dir,
    complete_checkpoints,
    latest_checkpoint,
    tag_for_step,
    write_atomic,
)
from ds_train.checkpoint.nvme_optimizer import offloads_optimizer_to_nvme, restore_skipped_optimizer_state
from ds_train.distributed.engine import DistributedContext, all_gather_object
from ds_train.distributed.peers import is_collective_failure
from ds_train.errors import RunFailure

log = logging.getLogger(__name__)


class CheckpointWriteError(RunFailure):
    """A checkpoint could not be written; the previous one is intact and still `latest`."""

    every_rank = True  # raised after the ranks gathered each other's write errors


class CheckpointManager:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        ctx: DistributedContext,
        keep_last: int,
        keep_host_memory: bool = True,
    ):
        self.root = checkpoints_dir(run_dir)
        self.ctx = ctx
        self.keep_last = keep_last
        self.keep_step: int | None = None  # a step whose checkpoint pruning spares (train.keep_best)
        self._kept_before: int | None = None  # the previous one, spared until keep_step's is written
        self.keep_every = 0  # steps that are multiples of it are spared too (train.keep_every)
        # background saves' host copies, kept from one save to the next unless keep_host_memory=False
        self.host_memory = HostMemory(keep=keep_host_memory)
        self.pending: _PendingSave | None = None  # a background save not yet completed
        self._warned_foreground = False  # save_async asked for with a writer it cannot use

    def writing(self) -> bool:
        """Whether this rank still has background checkpoint writes running."""
        return self.pending is not None and self.pending.writer is not None and self.pending.writer.busy()

    def save(
        self,
        engine: Any,
        step: int,
        state: dict,
        config_yaml: str,
        write_extras: Callable[[Path], None] | None = None,
        on_written: Callable[[Path], None] | None = None,
        *,
        background: bool = False,
    ) -> CheckpointRef | None:
        """Write a checkpoint for `step` on all ranks; it becomes `latest` only once complete.

        With `background`, DeepSpeed's files are copied to host memory and written by a thread
        (background.py); the save returns None at once and `finish()`, called by every rank at the
        same step once no rank is `writing()`, completes it. A save still pending is finished first.

        `write_extras(dir)` runs on rank 0 inside the checkpoint directory before it is completed
        (the HF model config and the tokenizer, so a checkpoint converts without the run config).
        `on_written(dir)` runs on every rank once its own files are written (fault injection).

        A failure to write (disk full, unwritable directory) raises CheckpointWriteError on every
        rank alike, naming the rank and the error; the previous checkpoint stays `latest`. Only a
        failure inside DeepSpeed's own writer ends that rank alone (its peers then fail at once on
        the closed connection, or at the collective timeout)."""
        self.finish()
        t0 = time.time()
        tag = tag_for_step(step)
        partial = tag + PARTIAL_SUFFIX
        error = None
        if self.ctx.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                self._remove_partials()
                if (self.root / tag).exists():  # the same step saved before (e.g. end after a periodic save)
                    shutil.rmtree(self.root / tag)
                self._check_free_space()
            except OSError as e:
                error = _describe(e)
        self._agree(tag, all_gather_object(error))
        written: dict[Path, tuple[int, str] | None] = {}
        writer = BackgroundWriter(self.host_memory) if background and is_plain_torch_writer(engine) else None
        if background and writer is None and not self._warned_foreground:
            self._warned_foreground = True
            log.warning(
                "train.save_async needs DeepSpeed's default checkpoint writer; saving in the foreground"
            )
        try:
            with hashed_writes(engine, written, writer):
                engine.save_checkpoint(str(self.root), tag=partial, client_state={}, save_latest=False)
        except BaseException as e:
            # torch.save reports a failed write as RuntimeError: this rank's, told to every rank
            local = isinstance(e, OSError | RuntimeError) and not is_collective_failure(e)
            if writer is not None and local:  # the error is reported once its queued writes end
                writer.wait()
            elif writer is not None:  # nothing else will wait for its writes or stop them
                writer.abandon()
            if local:
                raise CheckpointWriteError(
                    self._failure(tag, [(self.ctx.rank, _describe(e, self.root))])
                ) from None
            raise
        self.pending = _PendingSave(
            tag, step, state, config_yaml, write_extras, on_written, written, writer, _rng_state(), t0
        )
        if writer is None:
            return self.finish()
        log.info(
            "checkpoint %s copied to host memory in %.1fs; writing it in the background",
            tag,
            time.time() - t0,
        )
        return None

    def abandon(self) -> None:
        """A failing run gives up its pending background save: the writes stop early and the
        checkpoint stays `.partial`, never loaded (this rank alone, no collective)."""
        p, self.pending = self.pending, None
        if p is not None and p.writer is not None:
            if p.writer.busy():
                log.warning("checkpoint %s abandoned while being written: left partial", p.tag)
            p.writer.abandon()  # its copies are not handed to a later save either way

    def finish(self) -> CheckpointRef | None:
        """Complete the pending save, if any (every rank calls this at the same point): wait for this
        rank's writes, gather every rank's files and errors, and on rank 0 write the manifest, rename
        the directory and point `latest` at it."""
        p, self.pending = self.pending, None
        if p is None:
            return None
        partial = p.tag + PARTIAL_SUFFIX
        digests, error = {}, None
        failed = p.writer.wait() if p.writer is not None else None  # a background write, or the copy
        if failed is not None:
            error = _describe(failed, self.root)
        else:
            try:
                rng_file = self.root / partial / "rng" / f"rank_{self.ctx.rank:05d}.pt"
                rng_file.parent.mkdir(parents=True, exist_ok=True)
                torch.save(p.rng, rng_file)  # taken when the save began, as the other files were
                p.written[rng_file] = None
                digests = {
                    str(f.relative_to(self.root / partial)): d or digest(f) for f, d in p.written.items()
                }
                if p.on_written is not None:
                    p.on_written(self.root / partial)
            except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
                if is_collective_failure(e):
                    raise
                error = _describe(e, self.root)
        # Every rank reports its files (or its error): the checkpoint is complete only if all wrote.
        reports = all_gather_object((error, digests))
        self._agree(p.tag, [e for e, _ in reports])
        error = None
        if self.ctx.is_main:
            try:
                self._complete(p.tag, partial, p.step, p.state, p.config_yaml, p.write_extras, reports)
            except OSError as e:
                error = _describe(e)
            except Exception as e:  # e.g. a tokenizer's save_pretrained: every rank must hear of it
                log.exception("completing checkpoint %s failed", p.tag)  # rather than time out waiting
                error = _describe(e)
        self._agree(p.tag, all_gather_object(error))
        log.info(
            "checkpoint %s complete %.1fs after its save began", self.root / p.tag, time.time() - p.started
        )
        return CheckpointRef(self.root, p.tag)

    def _complete(self, tag, partial, step, state, config_yaml, write_extras, reports) -> None:
        """Rank 0: the ride-along files, the manifest, then the rename and `latest` (atomic)."""
        directory = self.root / partial
        (directory / CONFIG_FILE).write_text(config_yaml)
        if write_extras is not None:
            write_extras(directory)
        digests = {name: d for _, rank_digests in reports for name, d in rank_digests.items()}
        for p in sorted(directory.rglob("*")):  # files no rank reported (ours, or another writer's)
            name = str(p.relative_to(directory))
            if p.is_file() and name not in digests and name != STATE_FILE:
                digests[name] = digest(p)
        full_state = {
            **state,
            "step": step,
            "tag": tag,
            "world_size": self.ctx.world_size,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "files": {name: d[0] for name, d in sorted(digests.items())},
            "sha256": {name: d[1] for name, d in sorted(digests.items())},
        }
        write_atomic(directory / STATE_FILE, json.dumps(full_state, indent=1))
        os.replace(directory, self.root / tag)
        write_atomic(self.root / LATEST, tag)
        self._prune()

    def _check_free_space(self) -> None:
        """Refuse to start a save the file system cannot hold (as big as the last one), instead of
        filling it up half-way."""
        latest = latest_checkpoint(self.root)
        if latest is None:
            return
        needed = sum((latest.state().get("files") or {}).values())
        free = shutil.disk_usage(self.root).free
        if free < needed:
            raise OSError(
                errno.ENOSPC,
                f"only {_size(free)} free on the file system of {self.root}, the last checkpoint "
                f"took {_size(needed)}",
            )

    def _agree(self, tag: str, errors: list[str | None]) -> None:
        failed = [(rank, e) for rank, e in enumerate(errors) if e]
        if failed:
            if self.ctx.is_main:  # never loaded, and on a full disk it holds the space a re-run needs
                shutil.rmtree(self.root / (tag + PARTIAL_SUFFIX), ignore_errors=True)
            raise CheckpointWriteError(self._failure(tag, failed))

    def _failure(self, tag: str, failed: list[tuple[int, str]]) -> str:
        where = "; ".join(f"rank {rank}: {e}" for rank, e in failed)
        latest = latest_checkpoint(self.root)
        kept = f"{latest.path} is still the latest" if latest else "there is no earlier checkpoint"
        return f"could not write checkpoint {tag} ({where}); {kept}: free space or fix the directory and re-run to resume"

    def verify(self, ref: CheckpointRef, state: dict) -> None:
        """Check every file against the manifest (sizes and sha256), the work split across ranks;
        raise CheckpointDamaged on every rank if anything differs."""
        mine = manifest_problems(
            ref.path,
            state,
            names=share_of_files(state.get("files") or {}, self.ctx.rank, self.ctx.world_size),
        )
        problems = [p for rank_problems in all_gather_object(mine) for p in rank_problems]
        if problems:
            damaged = CheckpointDamaged(
                damaged_message(ref, problems, own=ref.root.resolve() == self.root.resolve())
            )
            damaged.every_rank = True  # every rank has the gathered list
            raise damaged

    def load(self, engine: Any, ref: CheckpointRef) -> dict:
        """Restore engine, optimizer, LR schedule and (same world size) this rank's RNG (the caller
        verifies the files first). DeepSpeed's files are unpickled with `weights_only=True` and an
        allow-list of DeepSpeed's few classes, never arbitrary objects."""
        state = ref.state()
        with safe_loading(engine):
            load_path, _ = engine.load_checkpoint(
                str(ref.root),
                tag=ref.tag,
                load_module_strict=True,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            if load_path is not None and offloads_optimizer_to_nvme(engine):
                restore_skipped_optimizer_state(engine, ref.root, ref.tag)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {ref.path}")
        rng_file = ref.path / "rng" / f"rank_{self.ctx.rank:05d}.pt"
        if state.get("world_size") == self.ctx.world_size and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        return state

    def _remove_partials(self) -> None:
        for p in self.root.glob(f"*{PARTIAL_SUFFIX}"):
            log.warning("removing incomplete checkpoint %s (a save that did not finish)", p)
            shutil.rmtree(p, ignore_errors=True)

    def keep_best_step(self, step: int) -> None:
        """Spare `step`'s checkpoint from pruning from now on (a new best evaluation). The one
        spared before stays until `step`'s is complete: a background save completing first would
        otherwise prune the old best, and a job dying then would leave no best checkpoint."""
        if step != self.keep_step:
            self._kept_before, self.keep_step = self.keep_step, step

    def _prune(self) -> None:
        refs = complete_checkpoints(self.root)
        spared = {self.keep_step}  # train.keep_best: the best evaluation's checkpoint stays
        if not any(ref.step == self.keep_step for ref in refs):
            spared.add(self._kept_before)
        for ref in refs[: max(0, len(refs) - self.keep_last)]:
            if ref.step not in spared and not (self.keep_every and ref.step % self.keep_every == 0):
                shutil.rmtree(ref.path, ignore_errors=True)
        # A universal copy made to resume on another world size is not needed once this run has
        # written a checkpoint of its own.
        for p in self.root.glob(f"*{UNIVERSAL_SUFFIX}"):
            shutil.rmtree(p, ignore_errors=True)


def share_of_files(sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
    """This rank's part of the files to check: each file, largest first, goes to the rank with the
    fewest bytes so far, so no rank reads much more than 1/world_size of the checkpoint (split by
    name, one rank could get two optimizer partitions and another two tiny RNG files). Every rank
    computes the same split from the same manifest."""
    loads = [(0, r) for r in range(world_size)]  # a heap of (bytes so far, rank)
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        total, r = heapq.heappop(loads)
        heapq.heappush(loads, (total + sizes[name], r))
        if r == rank:
            mine.append(name)
    return mine


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# torch's zip writer reports a failed write as a RuntimeError about its own state ("[enforce fail
# at inline_container.cc:…] . unexpected pos 3574592 vs 3574544"), the ENOSPC behind it lost
_ZIP_WRITER_FAILURE = ("inline_container", "PytorchStreamWriter")
_NEARLY_FULL = 64 << 20


def _describe(e: Exception, root: Path | None = None) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or e} ({e.filename})"
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if root is not None and any(s in first for s in _ZIP_WRITER_FAILURE):
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(root).free
            if free < _NEARLY_FULL:
                return f"No space left on device: {_size(free)} free on the file system of {root} (torch: {first})"
    return first


@dataclass
class _PendingSave:
    """A save whose files are written (or being written) but which is not yet complete."""

    tag: str
    step: int
    state: dict
    config_yaml: str
    write_extras: Callable[[Path], None] | None
    on_written: Callable[[Path], None] | None
    written: dict[Path, tuple[int, str] | None]
    writer: BackgroundWriter | None
    rng: dict  # this rank's RNG states at the saved step
    started: float
