"""torch.profiler over a window of training steps (the `profile` config section).

A low MFU asks where the step's time goes; a trace of a few steady-state steps answers it. As
torchtitan (`profiling.*`) and OLMo-core (ProfilerCallback) do, the profiler starts
`profile.warmup_steps` before `profile.start_step` (its own start-up cost stays out of the
recording), records `profile.steps` steps, and each recording rank writes to
<output_dir>/profile/steps_A-B/:

- rankN.pt.trace.json.gz: the Chrome trace (Perfetto, chrome://tracing, HTA); its
  `ProfilerStep#K` annotations carry the training step numbers;
- rankN.ops.txt: torch's operator table, heaviest self time (GPU time on a GPU) first;
- rankN.summary.json: `trace_summary.summarize_trace` of the trace (step times; on a GPU the busy
  share, kernel time by kind, exposed communication), also logged as one line;
- rankN.memory.pickle (profile.memory on a GPU): a CUDA allocator snapshot for pytorch.org/memory_viz.

A run that starts (or resumes) past the window records nothing and says so; one that stops inside
it writes what it recorded. The trace's last `ProfilerStep` annotation then holds the end of
training (final evaluation and checkpoint) rather than a step, and the summary leaves it out.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerAction, ProfilerActivity

from ds_train.config.schema import ProfileSection
from ds_train.train.callbacks.base import Callback
from ds_train.train.trace_summary import describe, load_trace, summarize_trace

log = logging.getLogger(__name__)

MEMORY_HISTORY_ENTRIES = 200_000  # allocation events the CUDA snapshot keeps (torch's example uses 100k)


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
        self.completed: int | None = None  # the last step that ran, when the recording ends
        self.finished = False

    def on_train_start(self, trainer) -> None:
        if trainer.step >= self.first:
            log.info("profile: the run starts after step %d; steps %d-%d are not recorded",
                     trainer.step, self.first, self.last)  # fmt: skip
            self.finished = True
            return
        self._maybe_start(trainer.step)

    def on_step_end(self, trainer) -> None:
        if self.prof is not None:
            self.prof.step()  # at the last recorded step, the schedule's RECORD_AND_SAVE writes
            if trainer.step >= self.last:
                self._stop(trainer.step)
        elif not self.finished:
            self._maybe_start(trainer.step)

    def on_train_end(self, trainer) -> None:
        if self.prof is not None:  # stopped inside the window: write what was recorded, if anything
            if trainer.step < self.first:
                log.info("profile: training stopped at step %d, before step %d", trainer.step, self.first)
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
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
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
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = self.dir / f"rank{self.rank}"
        trace = stem.with_name(stem.name + ".pt.trace.json.gz")
        prof.export_chrome_trace(str(trace))
        sort_by = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        stem.with_name(stem.name + ".ops.txt").write_text(
            prof.key_averages().table(sort_by=sort_by, row_limit=40)
        )
        if self.s.memory and self.cuda:
            torch.cuda.memory._dump_snapshot(str(stem.with_name(stem.name + ".memory.pickle")))
        # The summary is a reading aid: a trace it cannot parse must not end a training run.
        try:
            summary = summarize_trace(load_trace(trace), last_step=self.completed)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("profile: could not summarise %s: %s", trace, e)
            return
        stem.with_name(stem.name + ".summary.json").write_text(json.dumps(summary, indent=1))
        log.info("profile (rank %d): %s -> %s", self.rank, describe(summary), self.dir)


def wants_profiler(settings: ProfileSection, rank: int) -> bool:
    """Whether this rank records (profile.start_step set and the rank selected)."""
    return bool(settings.start_step) and (settings.ranks == "all" or rank in settings.ranks)
