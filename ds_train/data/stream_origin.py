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
of the same data continues it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamOrigin:
    step: int = 0  # the step an attempt resumed at
    samples: int = 0  # the stream position there

    def position(self, step: int, global_batch_size: int) -> int:
        """The stream position at which step `step` starts (the samples consumed before it)."""
        return self.samples + (step - self.step) * global_batch_size


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
    return StreamOrigin(
        step, int(consumed) if consumed is not None else step * int(state["global_batch_size"])
    )


def forced_resume_note(state: dict | None, fingerprint: str, global_batch_size: int) -> str | None:
    """What a resume forced onto other data or another global batch does to the stream (None for
    any other start)."""
    if not state:
        return None
    if not _other_data(state, fingerprint) and state.get("global_batch_size") in (None, global_batch_size):
        return None
    origin = resume_origin(state, fingerprint)
    where = (
        f"continues at sample {origin.samples}" if origin.samples else "is new: it starts at its beginning"
    )
    return f"the data stream {where} at step {origin.step} (run.force_resume)"


def _other_data(state: dict, fingerprint: str) -> bool:
    return (state.get("data") or {}).get("fingerprint") not in (None, fingerprint)
