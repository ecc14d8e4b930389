"""metrics.jsonl → the series a report plots, with resumes untangled.

metrics.jsonl is appended across resumes, so the steps between a run's last checkpoint and its
interruption appear twice: once from the interrupted attempt, once from the resumed one. The
resumed attempt is what the checkpoint lineage continues from, so for each step the last record
wins; the steps at which the file goes back in time are kept as resume points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ds_train.checkpoint.start_point import read_lineage
from ds_train.report.per_layer_norms import LayerNormSeries, layer_norm_series
from ds_train.train.callbacks.metrics_file import METRICS_FILE, read_metrics


@dataclass
class Series:
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.steps)


@dataclass
class RunMetrics:
    loss: Series
    valid_loss: Series
    valid_loss_by_set: dict[str, Series]  # data.valid set name → its own validation loss
    loss_by_source: dict[str, Series]  # data.train mixture source → its own training loss
    downstream: dict[str, Series]  # "<task>/acc", "<task>/acc_norm" (data.downstream) → by step
    tokens_per_s: Series
    tokens_per_s_per_device: Series
    mfu: Series
    step_time_s: Series
    data_wait_frac: Series
    peak_reserved_gib: Series
    alloc_retries: Series
    grad_norm: Series
    lr: Series
    slowest_rank: Series
    slowest_forward_ratio: Series
    skipped_steps: Series  # updates skipped on a spike so far (train.skip_spike_sigma)
    global_batch_size: Series  # the last step's global batch of each log line (train.batch_ramp)
    tokens: Series  # tokens trained by each log line's step (the comparison's x-axis by tokens)
    resumes: list[int]  # checkpoint steps a resumed attempt restarted from
    world_sizes: list[int]  # the ranks of each attempt, in order, repeats removed (elastic resume)
    layers: LayerNormSeries  # per-layer norms (train.per_layer_norms_every), empty when not logged
    run_dir: str = ""  # the run directory, resolved
    lineage: list[dict] = field(default_factory=list)  # the runs this one branched off (run.start_from)
    before_branch: Series = field(default_factory=Series)  # their train loss up to the branch point


TRAIN_KEYS = (
    "loss",
    "tokens_per_s",
    "tokens_per_s_per_device",
    "mfu",
    "step_time_s",
    "data_wait_frac",
    "peak_reserved_gib",
    "alloc_retries",
    "grad_norm",
    "lr",
    "slowest_rank",
    "slowest_forward_ratio",
    "skipped_steps",
    "global_batch_size",
    "tokens",
)


def skip_steps(metrics: RunMetrics) -> list[int]:
    """The log steps whose interval skipped an update on a spike: where the count rises (it is
    kept across resumes, so the resumed lineage counts on from its checkpoint)."""
    s, before, out = metrics.skipped_steps, 0.0, []
    for step, count in zip(s.steps, s.values):
        if count > before:
            out.append(step)
        before = count
    return out


def batch_changes(metrics: RunMetrics) -> list[tuple[int, int, int]]:
    """(first log step, batch before, batch after) where the global batch changed: a ramp's stages,
    or a resume forced onto another batch. The change happened within the interval ending there."""
    s = metrics.global_batch_size
    return [
        (s.steps[i], int(s.values[i - 1]), int(s.values[i]))
        for i in range(1, len(s))
        if s.values[i] != s.values[i - 1]
    ]


def load_run_metrics(run_dir: str | Path, records: list[dict] | None = None, depth: int = 8) -> RunMetrics:
    """RUN_DIR's metrics.jsonl as series (`records`: the file's lines, when already read), with
    the training loss of the runs it branched off (`depth` of them at most) up to the branch."""
    records = read_metrics(run_dir) if records is None else records
    train: dict[int, dict] = {}
    valid: dict[int, dict] = {}
    resumes: list[int] = []
    last_step = -1
    for r in records:
        step = int(r["step"])
        if "loss" in r:
            # a resumed attempt goes back in steps, or (stopped right after a log line) opens with
            # its start-up time
            if step <= last_step or ("startup_s" in r and last_step >= 0):
                # the attempt's first interval began at the checkpoint it resumed from
                resumes.append(step - int(r.get("interval_steps", 0)))
            last_step = step
            train[step] = r
        elif "valid_loss" in r or any(k.startswith("downstream/") for k in r):
            valid[step] = r
    out = {k: Series() for k in TRAIN_KEYS}
    by_source: dict[str, Series] = {}
    for step in sorted(train):
        for key in TRAIN_KEYS:
            value = train[step].get(key)
            if value is not None:
                out[key].steps.append(step)
                out[key].values.append(float(value))
        for key, value in train[step].items():
            if key.startswith("loss/"):
                series = by_source.setdefault(key.removeprefix("loss/"), Series())
                series.steps.append(step)
                series.values.append(float(value))
    valid_loss, by_set, downstream = Series(), {}, {}
    for step in sorted(valid):
        if "valid_loss" in valid[step]:
            valid_loss.steps.append(step)
            valid_loss.values.append(float(valid[step]["valid_loss"]))
        for key, value in valid[step].items():
            for prefix, into in (("valid_loss/", by_set), ("downstream/", downstream)):
                if key.startswith(prefix):
                    series = into.setdefault(key.removeprefix(prefix), Series())
                    series.steps.append(step)
                    series.values.append(float(value))
    worlds = [int(train[s]["world_size"]) for s in sorted(train) if train[s].get("world_size")]
    world_sizes = [w for i, w in enumerate(worlds) if i == 0 or w != worlds[i - 1]]
    ancestry = read_lineage(run_dir)
    return RunMetrics(
        valid_loss=valid_loss,
        valid_loss_by_set=by_set,
        downstream=downstream,
        loss_by_source=by_source,
        resumes=sorted(set(resumes)),
        world_sizes=world_sizes,
        layers=layer_norm_series(train),
        run_dir=str(Path(run_dir).resolve()),
        lineage=ancestry,
        before_branch=_before_branch(ancestry, depth),
        **out,
    )


def _before_branch(ancestry: list[dict], depth: int) -> Series:
    """The train loss a run's parent (and its parents) logged up to the step it branched off at,
    from its `ancestry` (lineage); empty for a run started afresh, or when the parent's directory
    is gone."""
    if not ancestry or depth <= 0:
        return Series()
    parent, step = Path(ancestry[-1]["run_dir"]), int(ancestry[-1]["step"])
    if not (parent / METRICS_FILE).is_file():
        return Series()
    full = loss_with_ancestors(load_run_metrics(parent, depth=depth - 1))
    kept = [(s, v) for s, v in zip(full.steps, full.values) if s <= step]
    return Series([s for s, _ in kept], [v for _, v in kept])


def loss_with_ancestors(m: RunMetrics) -> Series:
    """A run's training loss with its parents' before its branch point (a branch and its parent
    share the steps before the branch point)."""
    first = m.loss.steps[0] if len(m.loss) else None
    before = [
        (s, v) for s, v in zip(m.before_branch.steps, m.before_branch.values) if first is None or s < first
    ]
    return Series([s for s, _ in before] + m.loss.steps, [v for _, v in before] + m.loss.values)
