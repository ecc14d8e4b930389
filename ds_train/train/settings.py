"""What the training loop is told by the run config (train/session.py builds it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainerSettings:
    max_steps: int
    log_every: int
    save_every: int
    eval_every: int
    eval_steps: int
    seq_len: int
    flops_per_token: float | None = None
    peak_flops: float | None = None  # per device
    nonfinite: str = "stop"
    max_nonfinite: int = 3
    skip_spike_sigma: float = 0.0  # skip updates whose loss or grad norm spikes (spike_guard.py); 0: off
    skip_spike_window: int = 128
    per_layer_norms_every: int = 0  # per-layer gradient and weight norms every N steps; 0: off
    collective_timeout_s: float = 600.0
    straggler_ratio: float = 1.2  # warn when a rank's forwards take this × the other ranks' median (0: never)
    save_async: bool = False  # periodic saves: copy to host memory, write in the background
    save_final: bool = True  # a checkpoint at max_steps
    best_metric: str = "valid_loss"  # which evaluation is best (best_metric.py)
    keep_best: bool = False  # never prune the best evaluation's checkpoint
    early_stopping_patience: int = 0  # evaluations without a better best_metric before stopping (0: never)
    seed: int = 0  # run.seed: with the step and rank, it seeds each step's dropout (`step_seed`)
