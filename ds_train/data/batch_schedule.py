"""How many samples each optimizer step takes: `train.global_batch_size`, after an optional
batch-size ramp (`train.batch_ramp`).

Large batches are inefficient early in pretraining, when the gradient noise scale is small.
Recipes therefore start smaller and grow: GPT-3 ramped linearly over its first 4-12 B tokens,
Megatron has `--rampup-batch-size`, and Llama 3 doubled its batch in stages. A ramp here is a
list of stages, `[[500, 256], [1500, 512]]`: steps 1-500 (as logged) take global batches of 256,
steps 501-1500 of 512, and the rest `train.global_batch_size`. The micro-batch and the ranks stay
fixed, so each stage is a number of accumulation steps (distributed/deepspeed_config.py).

Steps are counted from 0 here, as the loader and stream origins count them: step `s` is the one
logged as `s + 1`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchSchedule:
    final: int  # train.global_batch_size: from the end of the ramp on
    ramp: tuple[tuple[int, int], ...] = ()  # (last step as logged, global batch), steps increasing

    @classmethod
    def of(cls, global_batch_size: int, ramp) -> BatchSchedule:
        """From config or checkpoint values (`ramp`: pairs as lists, or None for none)."""
        return cls(int(global_batch_size), tuple((int(u), int(b)) for u, b in (ramp or ())))

    def size(self, step: int) -> int:
        """The global batch of step `step` (counted from 0)."""
        for until, size in self.ramp:
            if step < until:
                return size
        return self.final

    def samples_between(self, start: int, end: int) -> int:
        """Samples that steps start..end-1 take together (0 when end ≤ start)."""
        total, stage_start = 0, 0
        for until, size in self.ramp:
            total += size * max(0, min(end, until) - max(start, stage_start))
            stage_start = until
        return total + self.final * max(0, end - max(start, stage_start))

    def steps_for(self, samples: int) -> int:
        """The fewest steps from the first that take at least `samples` samples."""
        steps, taken = 0, 0
        for until, size in self.ramp:
            stage = (until - steps) * size
            if taken + stage >= samples:
                return steps + -(-(samples - taken) // size)
            steps, taken = until, taken + stage
        return steps + max(0, -(-(samples - taken) // self.final))

    def same_from(self, other: BatchSchedule, step: int) -> bool:
        """Whether both take the same batches from step `step` on (a resume there sees no change)."""
        return self.same_between(other, step, None)

    def same_between(self, other: BatchSchedule, start: int, end: int | None) -> bool:
        """Whether both take the same batches in steps start..end (both counted from 0; None: on)."""
        bounds = {start, *(u for u, _ in self.ramp + other.ramp if u > start and (end is None or u <= end))}
        return all(self.size(s) == other.size(s) for s in bounds)

    def describe(self) -> str:
        """`a global batch of 512`, or `global batches of 256 to step 500, then 512`."""
        if not self.ramp:
            return f"a global batch of {self.final}"
        stages = ", ".join(f"{size} to step {until}" for until, size in self.ramp)
        return f"global batches of {stages}, then {self.final}"

    def as_state(self) -> dict:
        return {"global_batch_size": self.final, "batch_ramp": [list(stage) for stage in self.ramp]}

    @classmethod
    def from_state(cls, state: dict) -> BatchSchedule:
        """A checkpoint's or data_stream.jsonl's schedule (no `batch_ramp` before 2026-12-07: none)."""
        return cls.of(state["global_batch_size"], state.get("batch_ramp"))
