"""Where a resumed run's steps read the data stream (ds_train/data/stream_origin.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ds_train.data.batch_schedule import BatchSchedule as B
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


def test_the_run_directory_records_only_forced_changes_of_the_stream(tmp_path):
    """data_stream.jsonl: what `ds-train data order|show` read a resumed run's steps from."""
    from ds_train.data.stream_origin import HISTORY_FILE, StreamSegment, read_history, record_segment

    path = tmp_path / HISTORY_FILE
    record_segment(tmp_path, None, StreamSegment(FRESH, "f1", B(8)))  # a fresh start
    assert not path.exists()
    record_segment(tmp_path, STATE, StreamSegment(resume_origin(STATE, "f1"), "f1", B(8)))  # a plain resume
    assert not path.exists()
    # forced onto a batch of 16 at step 5: the segment before it is recorded too
    record_segment(tmp_path, STATE, StreamSegment(StreamOrigin(5, 40), "f1", B(16)))
    assert read_history(tmp_path) == [
        StreamSegment(FRESH, "f1", B(8)),
        StreamSegment(StreamOrigin(5, 40), "f1", B(16)),
    ]
    # a later plain resume continues the segment: nothing new
    later = {"step": 7, "global_batch_size": 16, "data": {"fingerprint": "f1", "consumed_samples": 72}}
    record_segment(tmp_path, later, StreamSegment(resume_origin(later, "f1"), "f1", B(16)))
    assert len(read_history(tmp_path)) == 2
    # then an anneal on other data at step 7
    record_segment(tmp_path, later, StreamSegment(resume_origin(later, "f2"), "f2", B(16)))
    assert read_history(tmp_path)[-1] == StreamSegment(StreamOrigin(7, 0), "f2", B(16))
    # resumed from the step-5 checkpoint, forced onto the batch of 16 again: the anneal is another timeline
    record_segment(tmp_path, STATE, StreamSegment(StreamOrigin(5, 40), "f1", B(16)))
    assert read_history(tmp_path) == [
        StreamSegment(FRESH, "f1", B(8)),
        StreamSegment(StreamOrigin(5, 40), "f1", B(16)),
    ]
    # resumed from it as the first run was: nothing forced is left, the file goes
    record_segment(tmp_path, STATE, StreamSegment(resume_origin(STATE, "f1"), "f1", B(8)))
    assert not path.exists()


def test_a_step_maps_to_the_origin_of_the_attempt_that_trained_it():
    from ds_train.data.stream_origin import StreamSegment, origin_at

    history = [
        StreamSegment(FRESH, "f1", B(8)),
        StreamSegment(StreamOrigin(5, 40), "f1", B(16)),
        StreamSegment(StreamOrigin(7, 0), "f2", B(16)),
    ]
    assert origin_at([], 3, "f9", 4) == FRESH  # no record: the formula of an uninterrupted run
    assert origin_at(history, 4, "f1", B(8)) == FRESH  # counted from 0: logged as step 5
    assert origin_at(history, 6, "f1", B(16)).position(6, 16) == 56
    assert origin_at(history, 9, "f2", B(16)).position(9, 16) == 32
    with pytest.raises(ValueError) as e:
        origin_at(history, 5, "f1", B(8))
    assert str(e.value) == (
        "step 6 was trained on a global batch of 16 (this config: a global batch of 8) (the run was "
        "resumed with another config): give the config of the attempt that trained steps 6-7"
    )
    with pytest.raises(ValueError, match="step 8 was trained on other data than this config's .* from 8 on"):
        origin_at(history, 7, "f1", B(16))
    with pytest.raises(ValueError, match="on other data than this config's and a global batch of 8"):
        origin_at(history, 0, "f2", B(16))
