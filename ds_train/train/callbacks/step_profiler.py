"""torch.profiler over a window of training steps (the `profile` config section).

A low MFU asks where the step's time goes; a trace of a few steady-state steps answers it. As
torchtitan (`profiling.*`) and OLMo-core (ProfilerCallback) do, the profiler starts
`profile.warmup_steps` before `profile.start_step` (its own start-up cost stays out of the
recording), records `profile.steps` steps, and each recording rank writes to
<output_dir>/profile/steps_A-B/:

- rankN.pt.trace.json.gz: the Chrome trace (Perfetto, chrome://tracing, HTA); its
  `ProfilerStep#K` annotations carry the training step numbers and span a whole loop iteration:
  the batch fetch, forward/backward/optimizer, and the logging, evaluation and save after it;
- rankN.ops.txt: torch's operator table, heaviest self time (GPU time on a GPU) first;
- rankN.summary.json: `trace_summary.summarize_trace` of the trace (step times; on a GPU the busy
  share, kernel time by kind, exposed communication), also logged as one line;
- rankN.memory.pickle (profile.memory on a GPU): a CUDA allocator snapshot for pytorch.org/memory_viz.

A run that starts (or resumes) at or after start_step records nothing and says so. One that stops
inside the window (preemption, an error: an OOM is when the memory snapshot matters most) writes
what it recorded; the trace's last annotation may then hold the end of training rather than a
step, and the summary leaves steps that did not finish out.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import torch
from torch.profiler import ProfilerAction, ProfilerActivity

from ds_train.config.schema import Config, ProfileSection
from ds_train.train.callbacks.base import Callback
from ds_train.train.trace_summary import describe, load_trace, summarize_trace

log = logging.getLogger(__name__)

MEMORY_HISTORY_ENTRIES = 200_000  # allocation events the CUDA snapshot keeps (torch's example: 100k)


class StepProfiler(Callback):
    def __init__(self, settings: ProfileSection, output_dir: str | Path, rank: int):
        self.s = settings
        self.first = settings.start_step
        self.last = settings.start_step + settings.steps - 1
        self.rank = rank
        self.dir = Path(output_dir) / "profile" / f"steps_{self.first}-{self.last}"
        self.cuda = torch.cuda.is_available()
        self.prof: torch.profiler.profile | None = None
        self.next_step = 0
        self.completed: int | None = None  # the last step that finished, when recording ends early
        self.finished = False

    def on_train_start(self, trainer) -> None:
        if trainer.step >= self.first:
            log.info("profile: the run starts after step %d; steps %d-%d are not recorded",
                     trainer.step, self.first, self.last)  # fmt: skip
            self.finished = True

    def on_step_start(self, trainer) -> None:
        if self.finished:
            return
        if self.prof is None:
            self._maybe_start(trainer.step)
            return
        self.prof.step()  # step trainer.step + 1 begins; after the last one, the trace is written
        if trainer.step >= self.last:
            self._stop(trainer.step)

    def on_train_end(self, trainer) -> None:
        if self.prof is not None:  # stopped inside the window: write what was recorded, if anything
            if trainer.step < self.first:
                log.info("profile: training stopped at step %d, before step %d", trainer.step, self.first)
            self._stop(trainer.step)

    def on_train_error(self, trainer, error: BaseException) -> None:
        if self.prof is not None:
            log.info("profile: writing what was recorded before the error")
            self._stop(trainer.step)

    def _maybe_start(self, done: int) -> None:
        """Start when the next step (done + 1) is the first of the warm-up, or later."""
        if done + 1 < self.first - self.s.warmup_steps:
            return
        # Step labels and the schedule use training step numbers; torch.profiler starts counting
        # at 0 (its constructor asks the schedule about step 0, which _action maps to this one).
        self.next_step = done + 1
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.prof = torch.profiler.profile(
            activities=activities,
            schedule=self._action,
            on_trace_ready=self._write,
            record_shapes=self.s.record_shapes,
            profile_memory=self.s.memory,
            with_stack=self.s.with_stack,
        )
        self.prof.step_num = self.next_step
        if self.s.memory and self.cuda:
            # Python frames only: C++ stacks make every allocation and the dump much slower
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES, stacks="python")
        self.prof.start()

    def _action(self, step: int) -> ProfilerAction:
        """What the profiler does during training step `step` (0: the step it starts at)."""
        step = step or self.next_step
        if step < self.first:
            return ProfilerAction.WARMUP
        if step < self.last:
            return ProfilerAction.RECORD
        return ProfilerAction.RECORD_AND_SAVE if step == self.last else ProfilerAction.NONE

    def _stop(self, completed: int) -> None:
        prof, self.prof, self.finished = self.prof, None, True
        self.completed = completed
        prof.stop()
        if self.s.memory and self.cuda:
            torch.cuda.memory._record_memory_history(enabled=None)

    def _write(self, prof: torch.profiler.profile) -> None:
        # A diagnostic must not end a training run (a full disk, a profiler bug): on this rank an
        # exception here would leave the other ranks waiting at the next collective until timeout.
        try:
            self._write_files(prof)
        except Exception as e:
            log.warning("profile: could not write %s: %s: %s", self.dir, type(e).__name__, e)

    def _write_files(self, prof: torch.profiler.profile) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"rank{self.rank}"
        # Exported plain, gzipped at level 6 in large chunks and summarised from the plain file:
        # torch's own .gz export writes line by line at level 9, 12x slower (0.59 s vs 0.05 s for
        # a 7.6 MB trace), and the summary would have to decompress it again.
        plain = self.dir / f"{name}.pt.trace.json"
        prof.export_chrome_trace(str(plain))
        try:
            with open(plain, "rb") as src, gzip.open(f"{plain}.gz", "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            if self.s.memory and self.cuda:
                torch.cuda.memory._dump_snapshot(str(self.dir / f"{name}.memory.pickle"))
            sort_by = "self_device_time_total" if self.cuda else "self_cpu_time_total"
            table = prof.key_averages(group_by_input_shape=self.s.record_shapes).table(
                sort_by=sort_by, row_limit=40
            )
            (self.dir / f"{name}.ops.txt").write_text(table)
            summary = summarize_trace(load_trace(plain), last_step=self.completed)
        finally:
            plain.unlink(missing_ok=True)
        (self.dir / f"{name}.summary.json").write_text(json.dumps(summary, indent=1))
        log.info("profile (rank %d): %s -> %s", self.rank, describe(summary), self.dir)


def wants_profiler(settings: ProfileSection, rank: int) -> bool:
    """Whether this rank records (profile.start_step set and the rank selected)."""
    return bool(settings.start_step) and (settings.ranks == "all" or rank in settings.ranks)


def window_notes(cfg: Config, world_size: int) -> list[str]:
    """What the user should know about the profile window before the run (logged by rank 0)."""
    p, t = cfg.profile, cfg.train
    if not p.start_step:
        return []
    notes = []
    if p.ranks != "all" and (missing := [r for r in p.ranks if r >= world_size]):
        notes.append(f"profile.ranks {missing}: no such rank among {world_size}; they record nothing")
    window = range(p.start_step, p.start_step + p.steps)
    for what, every in (("a checkpoint save", t.save_every), ("an evaluation", t.eval_every)):
        if every and (hit := [s for s in window if s % every == 0]):
            notes.append(
                f"profile: step {hit[0]} includes {what}, which its ProfilerStep annotation holds too"
            )
    return notes
