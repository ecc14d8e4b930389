"""Where a resumed run's steps read the data stream (ds_train/data/stream_origin.py)."""

from __future__ import annotations

import numpy as np

from ds_train.data.loader import rank_positions
from ds_train.data.stream_origin import FRESH, StreamOrigin, resume_origin
from ds_train.distributed.deepspeed_config import BatchLayout

STATE = {"step": 5, "global_batch_size": 8, "data": {"fingerprint": "f1", "consumed_samples": 40}}


def test_the_same_data_continues_at_the_checkpoint_position():
    assert resume_origin(None, "f1") == FRESH
    origin = resume_origin(STATE, "f1")
    assert origin == StreamOrigin(5, 40)
    # the same batch: exactly step × batch, as an uninterrupted run
    assert origin.position(7, 8) == 56 == FRESH.position(7, 8)
    # another global batch (run.force_resume): from sample 40 on, not 5 × 16 = 80 (40..79 skipped before)
    layout = BatchLayout(16, 8, 1, 2)
    taken = np.concatenate([rank_positions(5, 0, layout, r, origin) for r in range(2)])
    assert taken.tolist() == list(range(40, 56))


def test_other_data_starts_at_its_beginning():
    """A new mix entered at step × batch skipped its first rows for the whole pass (pretraining audit)."""
    origin = resume_origin(STATE, "f2")
    assert origin == StreamOrigin(5, 0) and origin.position(6, 8) == 8
    assert rank_positions(5, 0, BatchLayout(8, 8, 1, 1), 0, origin).tolist() == list(range(8))


def test_a_checkpoint_without_a_recorded_position_counts_steps():
    old = {"step": 5, "global_batch_size": 8, "data": {"fingerprint": "f1"}}
    assert resume_origin(old, "f1") == StreamOrigin(5, 40)
