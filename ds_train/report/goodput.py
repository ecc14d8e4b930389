"""Goodput: the share of a run's wall-clock time that went into training steps it kept.

MFU says how well a step uses the GPU; goodput says how much of the job's time was steps at all.
Llama 3's report calls it effective training time (over 90% on 16k GPUs); the rest is start-up
(imports, model build, engine, data plan: paid again by every requeued attempt), evaluation,
checkpoint saves, and work lost to failures: the steps between an attempt's last checkpoint and
its end, which the next attempt recomputes. metrics.jsonl carries what this needs per log line
(`interval_steps`, `step_time_s`, `eval_s`, `save_s`, `elapsed_s`, and `startup_s` on each
attempt's first line); this module adds it up over all attempts of a run directory.

Not seen, so the figure is approximate: the time after an attempt's last log line (its final
save, or the minutes before a crash), attempts that died before their first log line, the time a
requeued job waits in the queue, and what runs before the process exists (srun, a container's
start, torchrun's rendezvous). Each attempt's first step counts as a step although it carries
one-off costs (first batch, communicator set-up, kernel selection).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Goodput:
    attempts: int
    wall_s: float  # each attempt's process start to its last log line, summed
    kept_s: float  # steps that are part of the final lineage
    redone_s: float  # steps a later attempt recomputed after resuming from an earlier checkpoint
    startup_s: float
    eval_s: float
    save_s: float
    unaccounted_lines: int = 0  # train lines without time accounting (written by an older ds-train)

    @property
    def other_s(self) -> float:
        """Logging, callbacks between steps: the wall time no other part accounts for."""
        return max(
            0.0, self.wall_s - self.kept_s - self.redone_s - self.startup_s - self.eval_s - self.save_s
        )

    @property
    def ratio(self) -> float:
        return self.kept_s / self.wall_s if self.wall_s > 0 else 0.0

    def describe(self) -> str:
        if self.wall_s <= 0:
            return "goodput: no wall time recorded"
        hours = self.wall_s / 3600
        wall = f"{hours:.1f} h" if hours >= 1 else f"{self.wall_s / 60:.1f} min"
        parts = {
            "start-up": self.startup_s,
            "evaluation": self.eval_s,
            "checkpoint saves": self.save_s,
            "steps redone after a resume": self.redone_s,
            "other": self.other_s,
        }
        shares = ", ".join(
            f"{name} {t / self.wall_s:.1%}" for name, t in parts.items() if t >= 5e-4 * self.wall_s
        )
        plural = "attempt" if self.attempts == 1 else "attempts"
        older = (
            f"; {self.unaccounted_lines} earlier log lines carry no time accounting and are left out"
            if self.unaccounted_lines
            else ""
        )
        return (
            f"goodput: {self.ratio:.1%} of {wall} ({self.attempts} {plural}) went to training steps that were "
            f"kept; {shares} (time after an attempt's last log line is not seen{older})"
        )


def goodput(records: list[dict]) -> Goodput | None:
    """Goodput of the train records of metrics.jsonl in file order; None without time accounting."""
    lines = [r for r in records if "loss" in r]
    train = [r for r in lines if "interval_steps" in r and "elapsed_s" in r]
    if not train or "startup_s" not in train[0]:
        return None
    attempts: list[list[dict]] = []
    for r in train:
        if "startup_s" in r:  # the first log line of a new process
            attempts.append([])
        attempts[-1].append(r)
    # where each attempt started from: its first interval began at the resumed checkpoint's step
    starts = [a[0]["step"] - a[0]["interval_steps"] for a in attempts]
    total = Goodput(len(attempts), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, unaccounted_lines=len(lines) - len(train))
    for i, attempt in enumerate(attempts):
        # steps above the earliest restart point of any later attempt were done again there
        cutoff = min(starts[i + 1 :], default=float("inf"))
        total.wall_s += attempt[-1]["elapsed_s"]
        total.startup_s += attempt[0]["startup_s"]
        for r in attempt:
            first = r["step"] - r["interval_steps"]  # the interval holds steps first+1 .. step
            lost = max(0, r["step"] - max(first, cutoff))
            total.kept_s += r["step_time_s"] * (r["interval_steps"] - lost)
            total.redone_s += r["step_time_s"] * lost
            total.eval_s += r.get("eval_s", 0.0)
            total.save_s += r.get("save_s", 0.0)
    return total
