"""train.batch_ramp: the batch of each step (data/batch_schedule.py), the loader's positions and
micro-batches under it, and the checks at start (config, resume, epochs)."""

from __future__ import annotations

import numpy as np
import pytest

from ds_train.config import ConfigError
from ds_train.data.batch_schedule import BatchSchedule
from ds_train.data.loader import global_batch_positions, rank_positions
from ds_train.data.stream_origin import StreamOrigin
from ds_train.distributed.deepspeed_config import BatchLayout

RAMP = BatchSchedule(32, ((3, 8), (5, 16)))  # steps 1-3 (as logged) take 8, 4-5 take 16, then 32


def _sizes(schedule: BatchSchedule, steps: int) -> list[int]:
    return [schedule.size(s) for s in range(steps)]


def test_the_schedule_gives_each_step_its_stage_batch():
    assert _sizes(RAMP, 8) == [8, 8, 8, 16, 16, 32, 32, 32]
    assert _sizes(BatchSchedule(32), 3) == [32, 32, 32]
    for start in range(9):
        for end in range(12):
            assert RAMP.samples_between(start, end) == sum(_sizes(RAMP, 12)[start:end]), (start, end)
    for samples in range(0, 200, 7):
        steps = RAMP.steps_for(samples)
        assert (
            RAMP.samples_between(0, steps) >= samples > RAMP.samples_between(0, max(0, steps - 1))
            or samples == 0
        )
    assert RAMP.describe() == "global batches of 8 to step 3, 16 to step 5, then 32"
    assert BatchSchedule(32).describe() == "a global batch of 32"
    assert BatchSchedule.from_state(RAMP.as_state()) == RAMP
    assert BatchSchedule.from_state({"global_batch_size": 32}) == BatchSchedule(32)  # an older checkpoint


def test_schedules_are_the_same_from_a_step_when_their_batches_are():
    done = BatchSchedule(32)  # the ramp removed once it is over
    assert RAMP.same_from(done, 5) and done.same_from(RAMP, 7)
    assert not RAMP.same_from(done, 4)  # step 5 (logged) still takes 16
    longer = BatchSchedule(32, ((3, 8), (6, 16)))
    assert RAMP.same_from(longer, 0) is False and RAMP.same_from(longer, 6)


LAYOUT = BatchLayout(32, 2, 8, 2, RAMP.ramp)  # micro 2 on 2 ranks: accumulation 2, 4, then 8


def test_each_step_accumulates_its_stage_batch():
    assert [LAYOUT.at(s).grad_accum for s in range(7)] == [2, 2, 2, 4, 4, 8, 8]
    assert LAYOUT.at(0).ramp == () and LAYOUT.steady == BatchLayout(32, 2, 8, 2)
    for start in range(7):  # the k-th micro-batch a rank consumes from `start`, as the loop takes them
        expected = [(s, m) for s in range(start, 12) for m in range(LAYOUT.at(s).grad_accum)]
        assert [LAYOUT.micro_batch_at(start, k) for k in range(len(expected))] == expected


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_the_global_batches_tile_the_stream_on_any_number_of_ranks(ranks):
    """Each step reads the next `size(step)` positions, split over ranks and micro-batches with no
    gap and no overlap; the same global batch on 1, 2 or 4 ranks (elastic resume)."""
    layout = BatchLayout(32, 2, 32 // (2 * ranks), ranks, RAMP.ramp)
    start = 0
    for step in range(8):
        got = global_batch_positions(step, layout)
        assert got.tolist() == list(range(start, start + RAMP.size(step)))
        start += RAMP.size(step)
    # resumed at step 4 from a checkpoint at sample 24: the stream goes on from there
    origin = StreamOrigin(4, 24)
    assert global_batch_positions(4, layout, origin).tolist() == list(range(24, 40))
    mine = np.concatenate([rank_positions(5, m, layout, 0, origin) for m in range(layout.at(5).grad_accum)])
    assert mine.tolist() == list(range(40, 40 + 32 // ranks))


def test_the_config_checks_the_stages(tmp_path, shards):
    from ds_train.config import load_config, validate
    from ds_train.distributed.deepspeed_config import batch_layout
    from tests.helpers import base_config, write_config

    cfg = write_config(
        tmp_path / "c.yaml", base_config(tmp_path / "run", shards, train={"global_batch_size": 16})
    )
    ok = load_config(cfg, ["train.batch_ramp=[[4, 4], [8, 8]]"])
    validate(ok)
    assert batch_layout(ok.train, 1).ramp == ((4, 4), (8, 8))
    for ramp, message in (
        ("[[4, 4], [4, 8]]", "the stages' last steps must increase from 1, got 4 after 4"),
        ("[[0, 4]]", "must increase from 1, got 0"),
        (
            "[[4, 32]]",
            "the batch to step 4 is 32; each stage's global batch must be a multiple of "
            "train.micro_batch_size=2 and at most train.global_batch_size=16",
        ),
        ("[[4, 3]]", "the batch to step 4 is 3"),
        ("[[4]]", r"each stage is \[last step, global batch\], got \[4\]"),
        ("[4, 8]", r"each stage is \[last step, global batch\], got 4"),
    ):
        with pytest.raises(ConfigError, match=message):
            validate(load_config(cfg, [f"train.batch_ramp={ramp}"]))
    # 2 ranks × micro 2: a stage of 6 is 1.5 accumulation steps
    with pytest.raises(ConfigError, match="train.batch_ramp's batch to step 4=6 must equal"):
        batch_layout(load_config(cfg, ["train.batch_ramp=[[4, 6]]"]).train, 2)


def test_fine_tuning_refuses_a_ramp(tmp_path):
    from types import SimpleNamespace

    from ds_train.config.validate_finetune import validate_finetune

    cfg = SimpleNamespace(train=SimpleNamespace(batch_ramp=[[4, 4]]), finetune=None, data=None)
    with pytest.raises(ConfigError, match="train.batch_ramp is for pretraining"):
        validate_finetune(cfg)


def test_epochs_count_the_ramp_smaller_steps(tmp_path, shards):
    from ds_train.config import load_config
    from ds_train.train.epochs import resolve_epochs, steps_line
    from tests.helpers import base_config, write_config

    raw = base_config(
        tmp_path / "run", shards, train={"global_batch_size": 16, "max_steps": None, "epochs": 1}
    )
    cfg = load_config(write_config(tmp_path / "c.yaml", raw), ["train.batch_ramp=[[4, 4], [6, 8]]"])
    resolve_epochs(cfg, rows=100, what="test rows")
    # 4 steps of 4 and 2 of 8 take 32 rows; the other 68 need 5 steps of 16
    assert cfg.train.max_steps == 6 + 5
    assert steps_line(cfg).startswith(
        "max_steps 11 (train.epochs=1); global batches of 4 to step 4, 8 to step 6, then 16 (train.batch_ramp)"
    )


def _state(step: int, **batch) -> dict:
    return {"step": step, "global_batch_size": 32, "data": {"fingerprint": "f"}, **batch}


def test_a_resume_that_changes_the_batches_from_its_step_on_needs_force():
    from ds_train.checkpoint.compat import check_resume

    def check(state, ramp, force=False):
        check_resume(state, where="run", model_sig={}, tokenizer_sha=None, objective="causal_lm",
                     global_batch_size=32, batch_ramp=ramp, force=force)  # fmt: skip

    ramp = [[3, 8], [5, 16]]
    check(_state(4, batch_ramp=ramp), ramp)  # mid-ramp, the same stages
    check(_state(5, batch_ramp=ramp), [])  # a finished ramp removed: nothing changes from step 6
    check(_state(6), ramp)  # a ramp added after its steps: nothing changes either
    with pytest.raises(ConfigError) as e:
        check(_state(4, batch_ramp=ramp), [])
    assert (
        "global batches of 8 to step 3, 16 to step 5, then 32 (this run: a global batch of 32; "
        "train.global_batch_size, train.batch_ramp), which changes the samples per step from step 5 on"
    ) in str(e.value)
    check(_state(4, batch_ramp=ramp), [], force=True)


def test_the_stream_continues_under_the_new_schedule_and_is_recorded(tmp_path):
    from ds_train.data.stream_origin import (
        StreamSegment,
        forced_resume_note,
        origin_at,
        read_history,
        record_segment,
        resume_origin,
    )

    state = {**_state(4, batch_ramp=[[3, 8], [5, 16]]), "data": {"fingerprint": "f", "consumed_samples": 40}}
    assert resume_origin(state, "f") == StreamOrigin(4, 40)
    assert forced_resume_note(state, "f", RAMP) is None
    assert (
        forced_resume_note(state, "f", BatchSchedule(32))
        == "the data stream continues at sample 40 from step 5 on (run.force_resume)"
    )
    # a checkpoint without a recorded position counts its schedule's batches
    assert resume_origin({**state, "data": {"fingerprint": "f"}}, "f") == StreamOrigin(4, 40)
    record_segment(tmp_path, state, StreamSegment(StreamOrigin(4, 40), "f", RAMP))
    assert read_history(tmp_path) == []  # resumed as it was
    record_segment(tmp_path, state, StreamSegment(StreamOrigin(4, 40), "f", BatchSchedule(32)))
    history = read_history(tmp_path)
    assert [s.schedule for s in history] == [RAMP, BatchSchedule(32)]
    assert origin_at(history, 2, "f", RAMP).position(2, RAMP) == 16
    assert origin_at(history, 5, "f", BatchSchedule(32)).position(5, 32) == 72


def test_the_trainer_takes_each_stage_micro_batches_and_marks_their_last_for_deepspeed():
    """With a ramp, DeepSpeed (configured for the final accumulation) is told each step's last
    micro-batch; without one it counts them itself and is never told."""
    import torch

    from tests.unit.stand_in_trainer import LogRecords, StandInEngine, stand_in_trainer

    class Engine(StandInEngine):
        def __init__(self):
            super().__init__()
            self.boundaries: list[bool] = []

        def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
            self.boundaries.append(is_boundary)

    layout = BatchLayout(4, 1, 4, 1, ((2, 1), (3, 2)))  # accumulation 1, 1, 2, then 4

    def batches():
        for step in range(5):
            for _ in range(layout.at(step).grad_accum):
                yield {"step": torch.tensor(step), "num_targets": torch.tensor(8)}

    logs = LogRecords()
    trainer = stand_in_trainer([logs], batches(), max_steps=5, log_every=1, layout=layout)
    trainer.engine = Engine()
    assert trainer.fit() == 0
    accum = [1, 1, 2, 4, 4]
    assert trainer.engine.boundaries == [k == n - 1 for n in accum for k in range(n)]
    assert [r["samples"] for r in logs.records] == [1, 2, 4, 8, 12]
    assert [r["global_batch_size"] for r in logs.records] == [1, 1, 2, 4, 4]
    plain = stand_in_trainer([], max_steps=2)
    plain.engine = Engine()
    assert plain.fit() == 0 and plain.engine.boundaries == []


def test_fp16_gradients_are_unscaled_before_their_norms():
    from types import SimpleNamespace

    from ds_train.distributed.param_shards import loss_scale

    def engine(fp16: bool, **optimizer):
        return SimpleNamespace(fp16_enabled=lambda: fp16, optimizer=SimpleNamespace(**optimizer))

    assert loss_scale(engine(False, loss_scale=1024.0)) == 1.0  # bf16/fp32: nothing to undo
    assert loss_scale(engine(True, loss_scale=1024.0)) == 1024.0  # ZeRO optimizers
    assert loss_scale(engine(True, cur_scale=512.0)) == 512.0  # FP16_Optimizer


def test_a_config_without_the_finished_ramp_still_shows_the_steps_after_it(tmp_path):
    """A resume that dropped a finished ramp needs no force and writes a segment; the config with the
    ramp and the one without both read steps after it as the run did, and only the one with the
    ramp reads the ramp's steps."""
    from ds_train.data.stream_origin import StreamSegment, origin_at, read_history, record_segment

    state = {**_state(5, batch_ramp=[[3, 8], [5, 16]]), "data": {"fingerprint": "f", "consumed_samples": 56}}
    record_segment(tmp_path, state, StreamSegment(StreamOrigin(5, 56), "f", BatchSchedule(32)))
    history = read_history(tmp_path)
    assert len(history) == 2
    assert (
        origin_at(history, 6, "f", RAMP)
        == origin_at(history, 6, "f", BatchSchedule(32))
        == StreamOrigin(5, 56)
    )
    assert origin_at(history, 2, "f", RAMP).position(2, RAMP) == 16
    with pytest.raises(ValueError, match="step 3 was trained on global batches of 8 to step 3"):
        origin_at(history, 2, "f", BatchSchedule(32))


def test_data_order_valid_reads_whole_batches_and_the_ramp_refuses_what_it_cannot_drive(
    tmp_path, shards, capsys
):
    import json

    from ds_train.cli import main
    from ds_train.config import load_config, validate
    from tests.helpers import base_config, write_config

    raw = base_config(tmp_path / "run", shards, train={"global_batch_size": 8, "batch_ramp": [[2, 4]]},
                      data={"valid": str(shards / "valid")})  # fmt: skip
    cfg = write_config(tmp_path / "c.yaml", raw)
    assert main(["data", "order", str(cfg), "--steps", "3", "--json"]) == 0
    assert [len(json.loads(x)["samples"]) for x in capsys.readouterr().out.splitlines()] == [4, 4, 8]
    assert main(["data", "order", str(cfg), "--valid", "--steps", "2", "--json"]) == 0
    assert [len(json.loads(x)["samples"]) for x in capsys.readouterr().out.splitlines()] == [8, 8]
    with pytest.raises(ConfigError, match="train.batch_ramp needs DeepSpeed's managed gradient accumulation"):
        validate(load_config(cfg, ['zero.ds_config_overrides={"managed_gradient_accumulation": false}']))
    with pytest.raises(
        ConfigError, match="per_layer_norms_every cannot read optimizer states offloaded to NVMe"
    ):
        validate(load_config(cfg, ["train.per_layer_norms_every=1", "zero.stage=3", "zero.offload_optimizer=nvme",
                                   f"zero.nvme_path={tmp_path}"]))  # fmt: skip


def test_a_step_is_read_as_trained_when_the_batches_up_to_it_agree():
    """Schedules compared over a segment's steps up to the one asked about, not beyond it."""
    from ds_train.data.stream_origin import StreamSegment, origin_at

    trained = BatchSchedule(32, ((3, 8), (20, 16)))
    history = [
        StreamSegment(StreamOrigin(0, 0), "f", trained),
        StreamSegment(StreamOrigin(10, 152), "f", BatchSchedule(32)),
    ]
    other = BatchSchedule(16, ((3, 8),))  # the same batches through step 10, another beyond
    assert trained.same_between(other, 0, 9) and not trained.same_from(other, 0)
    assert origin_at(history, 5, "f", other) == StreamOrigin(0, 0)
