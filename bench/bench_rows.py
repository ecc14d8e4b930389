"""The rows every system in bench_trainer.py trains on, read with ds_train's own plan and reader.

The baselines get the very rows `ds-train pretrain` reads (same seed, same order, same per-rank
slices), materialised in memory before timing starts, so they pay nothing for data loading while
ds-train pays for its loader: any difference in tokens/s is ds-train's overhead, loader included.
"""

from __future__ import annotations

import numpy as np
import torch

from ds_train.config.schema import Config
from ds_train.data.loader import MicroBatches, build_plan
from ds_train.distributed.deepspeed_config import batch_layout
from ds_train.objectives.causal_lm import CausalLM


def rank_micro_batches(cfg: Config, world_size: int, rank: int, steps: int) -> list[torch.Tensor]:
    """input_ids [micro_batch, seq_len] of each micro-batch `rank` consumes in `steps` steps."""
    layout = batch_layout(cfg.train, world_size)
    plan = build_plan(
        cfg.data.train, seed=cfg.run.seed, shuffle=cfg.data.shuffle, window=cfg.data.shuffle_window
    )
    dataset = MicroBatches(plan, layout, rank, 0, CausalLM(eos_id=None), cache_dir=None)
    return [dataset[k]["input_ids"] for k in range(steps * layout.grad_accum)]


def global_rows(cfg: Config, steps: int) -> np.ndarray:
    """All input_ids rows of `steps` global batches [steps × global_batch, seq_len] (rank 0's view
    of a 1-rank layout covers the whole global batch), for loops that shard data themselves."""
    rows = rank_micro_batches(_one_rank(cfg), 1, 0, steps)
    return torch.cat(rows).numpy()


def _one_rank(cfg: Config) -> Config:
    import copy

    one = copy.deepcopy(cfg)
    one.train.micro_batch_size = cfg.train.global_batch_size
    return one
