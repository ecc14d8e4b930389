"""Where in the data stream each step starts, across resumes that change the batch or the data.

Step s of an uninterrupted run trains on stream positions s × global_batch_size onwards. A run
resumed with `run.force_resume` may change what that formula assumes:

- another `train.global_batch_size`: the checkpoint consumed `step × old batch` samples; counting
  in the new batch skipped (or repeated) the samples between the two (a warned gap before);
- another `data.train` (an anneal, a new mix): its stream starts at its beginning; entering it at
  the old run's position skipped its first `step × batch` rows, never to be seen in a pass
  (pretraining audit: 48 of 224 rows skipped and 48 seen twice).

So positions count from an origin: the resumed step and the stream position there, which is the
checkpoint's `consumed_samples` for the same data, or 0 for other data. A fresh run's origin is
(0, 0) and the formula above is unchanged; checkpoints record the stream position, so a later resume
of the same data continues it. With a batch-size ramp (data/batch_schedule.py) the steps from the
origin take the schedule's batches, not `global_batch_size` each.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ds_train.data.batch_schedule import BatchSchedule


@dataclass(frozen=True)
class StreamOrigin:
    step: int = 0  # the step an attempt resumed at
    samples: int = 0  # the stream position there

    def position(self, step: int, batch: BatchSchedule | int) -> int:
        """The stream position at which step `step` starts (the samples consumed before it), with
        `batch` the run's schedule or its one global batch."""
        schedule = BatchSchedule(batch) if isinstance(batch, int) else batch
        return self.samples + schedule.samples_between(self.step, step)


FRESH = StreamOrigin()  # a run from its first step (immutable: safe as a default argument)


def resume_origin(state: dict | None, fingerprint: str) -> StreamOrigin:
    """The origin a run resuming from a checkpoint's `state` continues from, on data whose
    fingerprint is `fingerprint` (a fresh start: the stream's beginning)."""
    if not state:
        return FRESH
    step = int(state["step"])
    if _other_data(state, fingerprint):  # run.force_resume
        return StreamOrigin(step, 0)
    consumed = (state.get("data") or {}).get("consumed_samples", state.get("consumed_samples"))
    if consumed is None:  # a checkpoint from before the position was recorded
        consumed = BatchSchedule.from_state(state).samples_between(0, step)
    return StreamOrigin(step, int(consumed))


def forced_resume_note(state: dict | None, fingerprint: str, schedule: BatchSchedule) -> str | None:
    """What a resume forced onto other data or other batches (from its step on) does to the
    stream (None for any other start)."""
    if not state:
        return None
    if not _other_data(state, fingerprint) and not _other_batches(state, schedule):
        return None
    origin = resume_origin(state, fingerprint)
    where = (
        f"continues at sample {origin.samples}" if origin.samples else "is new: it starts at its beginning"
    )
    return f"the data stream {where} from step {origin.step + 1} on (run.force_resume)"


def _other_data(state: dict, fingerprint: str) -> bool:
    return (state.get("data") or {}).get("fingerprint") not in (None, fingerprint)


def _other_batches(state: dict, schedule: BatchSchedule) -> bool:
    """Whether the steps from the checkpoint's on take other batches than its run's would have."""
    if not state.get("global_batch_size"):
        return False
    return not BatchSchedule.from_state(state).same_from(schedule, int(state["step"]))


# --- the run directory's record of changes -------------------------------------------------------
# `ds-train data order|show` map a step to its samples with the formula above. After a resume that
# changed the data or the batch schedule, the origin lives only in the attempt that trained the
# steps, so each attempt that moves it writes the change to <run_dir>/data_stream.jsonl; a run
# resumed only as it was keeps no such file.

HISTORY_FILE = "data_stream.jsonl"


@dataclass(frozen=True)
class StreamSegment:
    """Steps from `origin.step` on (until the next segment) read `fingerprint`'s data from
    `origin.samples`, taking `batch`'s global batches."""

    origin: StreamOrigin
    fingerprint: str
    schedule: BatchSchedule

    def as_dict(self) -> dict:
        o = self.origin
        return {
            "step": o.step,
            "samples": o.samples,
            "fingerprint": self.fingerprint,
            **self.schedule.as_state(),
        }

    def as_json(self) -> str:
        return json.dumps(self.as_dict())

    @classmethod
    def from_json(cls, line: str) -> StreamSegment:
        return cls.from_dict(json.loads(line))

    @classmethod
    def from_dict(cls, d: dict) -> StreamSegment:
        return cls(
            StreamOrigin(int(d["step"]), int(d["samples"])), d["fingerprint"], BatchSchedule.from_state(d)
        )

    def continued_by(self, other: StreamSegment) -> bool:
        """Whether `other` (a later start) reads on exactly as this segment would."""
        same = (self.fingerprint, self.schedule) == (other.fingerprint, other.schedule)
        return same and self.origin.position(other.origin.step, self.schedule) == other.origin.samples


def read_history(run_dir: str | Path) -> list[StreamSegment]:
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    return [StreamSegment.from_json(line) for line in path.read_text().splitlines() if line.strip()]


def inherited_history(state: dict, run_dir: str | Path) -> list[StreamSegment]:
    """What a branch off the checkpoint `state` of the run in `run_dir` inherits: the checkpoint's
    own record, or (checkpoints from before it was kept, 2026-12) its run's file as it is now."""
    if "data_stream" in state:
        return [StreamSegment.from_dict(d) for d in state["data_stream"]]
    return read_history(run_dir)


def record_segment(
    run_dir: str | Path,
    state: dict | None,
    segment: StreamSegment,
    inherited: list[StreamSegment] | None = None,
) -> list[StreamSegment]:
    """At an attempt's start (rank 0), after resuming from the checkpoint `state` (None: fresh).
    `inherited`: the history of the run a branch (run.start_from) was taken from, in place of
    this run directory's own.

    Segments from the resumed step on belong to a timeline this attempt replaces (a resume from an
    older checkpoint) and are dropped. The new segment is written only where it changes something:
    other data, another batch schedule (even one that takes the same batches from here on: the
    steps before differ), or another stream position. The first change also records the segment
    before it, the checkpoint's data and batches from step 0 (changes made before this file
    existed, in 2026-12, are not known). Returns what the file now holds ([] when there is none),
    which each checkpoint keeps as `data_stream`."""
    path = Path(run_dir) / HISTORY_FILE
    start = segment.origin.step
    earlier = read_history(run_dir) if inherited is None else inherited
    history = [s for s in earlier if s.origin.step < start]
    if not history and state:
        before = (state.get("data") or {}).get("fingerprint", segment.fingerprint)
        history = [StreamSegment(FRESH, before, BatchSchedule.from_state(state))]
    if history and not history[-1].continued_by(segment):
        history.append(segment)
    if len(history) < 2:  # at most the stream from step 0: nothing changed
        path.unlink(missing_ok=True)
        return []
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(s.as_json() + "\n" for s in history))
    tmp.replace(path)
    return history


def origin_at(
    history: list[StreamSegment], step: int, fingerprint: str, schedule: BatchSchedule
) -> StreamOrigin:
    """The origin step `step` (counted from 0 as origins are: the step logged as `step + 1`) of a
    run with this `history` read its samples from, for a config whose data has `fingerprint` and
    batches `schedule`; ValueError when that config did not train the step (the run was resumed
    onto other data or other batches before or after it)."""
    segments = [s for s in history if s.origin.step <= step]
    if not segments:
        return FRESH
    seg = segments[-1]
    # another schedule that takes the same batches over the segment's steps up to this one (a
    # finished ramp removed) reads the same positions there
    same_batches = seg.schedule.same_between(schedule, seg.origin.step, step)
    if seg.fingerprint == fingerprint and same_batches:
        return seg.origin
    later = [s.origin.step for s in history if s.origin.step > seg.origin.step]
    first = seg.origin.step + 1  # as logged
    steps = f"steps {first}-{later[0]}" if later else f"the steps from {first} on"
    what = []
    if seg.fingerprint != fingerprint:
        what.append("other data than this config's")
    if not same_batches:
        what.append(f"{seg.schedule.describe()} (this config: {schedule.describe()})")
    raise ValueError(
        f"step {step + 1} was trained on {' and '.join(what)} (the run was resumed with another "
        f"config): give the config of the attempt that trained {steps}"
    )
