"""A resume takes the optimizer settings from the config, not from the checkpoint: DeepSpeed
restores the checkpoint's LambdaLR base_lrs and the optimizer's groups, so a run resumed with a
lower train.lr (after a loss spike, say) went on at the old one. Checked here on a plain AdamW and
LambdaLR, the objects DeepSpeed saves and restores, with `engine.lr_scheduler` as DeepSpeed has it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from ds_train.train.optimizer_groups import optimizer_settings, restore_optimizer_settings
from ds_train.train.schedule import lr_multiplier


def _engine(lr: float, weight_decay: float, betas: tuple, max_steps: int = 10):
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.zeros(4))
    groups = [{"params": [w], "weight_decay": weight_decay}, {"params": [b], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)
    lam = lr_multiplier("cosine", 2, max_steps, 0.1)
    scheduler = LambdaLR(optimizer, lam)
    return SimpleNamespace(lr_scheduler=scheduler, optimizer=optimizer, params=(w, b)), lam


def _train(engine, steps: int) -> None:
    for _ in range(steps):
        loss = (engine.params[0].sum() + engine.params[1].sum()) ** 2
        loss.backward()
        engine.optimizer.step()
        engine.optimizer.zero_grad()
        engine.lr_scheduler.step()


def _resume(saved, lr, weight_decay, betas, max_steps=10):
    """A new engine from the config, the checkpoint loaded into it as DeepSpeed does, then restored."""
    engine, lam = _engine(lr, weight_decay, betas, max_steps)
    configured = optimizer_settings(engine)
    engine.optimizer.load_state_dict(saved[0])
    engine.lr_scheduler.load_state_dict(saved[1])
    changed, restored = restore_optimizer_settings(engine, configured, lam)
    assert restored == ""  # nothing else changed by the loading here
    return engine, changed, lam


@pytest.fixture
def checkpoint():
    engine, _ = _engine(1e-3, 0.1, (0.9, 0.95))
    _train(engine, 4)
    return engine.optimizer.state_dict(), engine.lr_scheduler.state_dict()


def test_unchanged_settings_resume_exactly(checkpoint):
    reference, _ = _engine(1e-3, 0.1, (0.9, 0.95))
    _train(reference, 4)
    engine, changed, _ = _resume(checkpoint, 1e-3, 0.1, (0.9, 0.95))
    assert changed == ""
    assert [g["lr"] for g in engine.optimizer.param_groups] == [
        g["lr"] for g in reference.optimizer.param_groups
    ]


def test_the_configs_lr_weight_decay_and_betas_win(checkpoint):
    engine, changed, lam = _resume(checkpoint, 1e-2, 0.5, (0.8, 0.99))
    assert changed == "lr 0.001 → 0.01; betas (0.9, 0.95) → (0.8, 0.99); weight_decay 0.1 → 0.5"
    groups = engine.optimizer.param_groups
    assert [g["lr"] for g in groups] == [1e-2 * lam(4)] * 2  # the new peak on the schedule at step 4
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]  # norms and biases stay undecayed
    assert all(tuple(g["betas"]) == (0.8, 0.99) for g in groups)
    _train(engine, 1)  # and the scheduler goes on from the new peak
    assert groups[0]["lr"] == pytest.approx(1e-2 * lam(5))


def test_a_longer_schedule_applies_from_the_first_resumed_step(checkpoint):
    engine, changed, lam = _resume(checkpoint, 1e-3, 0.1, (0.9, 0.95), max_steps=20)
    assert changed == ""  # the schedule's length is not a setting of the checkpoint's
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lam(4))
    assert lam(4) != lr_multiplier("cosine", 2, 10, 0.1)(4)  # it was the old schedule's value


def test_a_group_the_loading_changed_is_put_back_without_blaming_the_config(checkpoint):
    """DeepSpeed's universal-format loading (an elastic resume) gives the no-decay group the decay
    group's weight decay: put back, and not reported as a change of the config's."""
    engine, lam = _engine(1e-3, 0.1, (0.9, 0.95))
    configured = optimizer_settings(engine)
    engine.optimizer.load_state_dict(checkpoint[0])
    engine.lr_scheduler.load_state_dict(checkpoint[1])
    engine.optimizer.param_groups[1]["weight_decay"] = 0.1  # as that loading leaves it
    changed, restored = restore_optimizer_settings(engine, configured, lam)
    assert changed == "" and restored == "parameter group 1's weight_decay 0.1 → 0.0"
    assert engine.optimizer.param_groups[1]["weight_decay"] == 0.0


def test_a_changed_schedule_is_named_with_the_jump_it_makes():
    from ds_train.train.schedule import schedule_change_note, schedule_settings

    ended = SimpleNamespace(
        lr=1e-3, schedule="cosine", warmup_steps=5, max_steps=20, min_lr_ratio=0.1, decay_steps=None
    )
    saved = schedule_settings(ended)
    assert schedule_change_note(saved, ended, 20) is None and schedule_change_note(None, ended, 20) is None
    longer = SimpleNamespace(**{**vars(ended), "max_steps": 30})
    note = schedule_change_note(saved, longer, 20)
    before = 1e-3 * lr_multiplier("cosine", 5, 20, 0.1)(20)
    after = 1e-3 * lr_multiplier("cosine", 5, 30, 0.1)(20)
    assert after > 3 * before  # the jump the note is about
    assert note == (
        "the learning-rate schedule changed since the checkpoint (train.max_steps 20 → 30): it is recomputed "
        f"over the new settings, so step 21 trains at lr {after:.3g} where the checkpoint's schedule gave {before:.3g}"
    )


@pytest.mark.slow
def test_a_forced_resume_with_another_batch_counts_what_was_trained(tmp_path, shards):
    """Resumed with run.force_resume and another global_batch_size, `samples`/`tokens` counted
    step × the new batch (20 × 16 for 20 steps of 8: sweep audit); a longer max_steps is named;
    and a restart of the finished run does not evaluate it again."""
    from tests.helpers import base_config, read_metrics, run_cli, write_config

    cfg = base_config(
        tmp_path / "run",
        shards,
        data={"valid": str(shards / "valid")},
        train={"max_steps": 4, "global_batch_size": 8, "log_every": 1, "eval_steps": 1},
    )
    run_cli(["pretrain", write_config(tmp_path / "a.yaml", cfg)])
    cfg["train"].update(max_steps=6, global_batch_size=16)
    cfg["run"]["force_resume"] = True
    proc = run_cli(["pretrain", write_config(tmp_path / "b.yaml", cfg)])
    records = read_metrics(tmp_path / "run")
    samples = {r["step"]: (r["samples"], r["tokens"]) for r in records if "loss" in r}
    assert samples[4] == (32, 32 * 32) and samples[5] == (32 + 16, 48 * 32) and samples[6] == (64, 64 * 32)
    assert "the learning-rate schedule changed since the checkpoint (train.max_steps 4 → 6)" in proc.stderr
    # the stream went on from sample 32, not from 4 × 16 = 64 (samples 32..63 were skipped)
    assert "the data stream continues at sample 32 from step 5 on" in proc.stderr
    assert _state(tmp_path / "run", 6)["data"]["consumed_samples"] == 32 + 2 * 16
    # `ds-train data order` on the run follows it: steps 5-6 read what steps 5-8 of batch 8 would have
    cfg_b = tmp_path / "b.yaml"
    order = [json.loads(x)["samples"] for x in _order(cfg_b, 5, 2).splitlines()]
    ref = {**cfg, "run": {**cfg["run"], "output_dir": str(tmp_path / "fresh")}, "train": {**cfg["train"]}}
    ref["train"]["global_batch_size"] = 8
    fresh = [
        json.loads(x)["samples"] for x in _order(write_config(tmp_path / "r.yaml", ref), 5, 4).splitlines()
    ]
    assert order == [fresh[0] + fresh[1], fresh[2] + fresh[3]]
    ref["run"]["output_dir"] = str(tmp_path / "run")  # the first attempt's config, on the run
    assert (
        _order(write_config(tmp_path / "a2.yaml", ref), 1, 4).splitlines()
        == _order(tmp_path / "r.yaml", 1, 4).splitlines()
    )
    refused = run_cli(["data", "order", cfg_b, "--start-step", 4, "--steps", 1], check=False)
    assert refused.returncode == 2, refused.stderr
    assert "step 4 was trained on a global batch of 8 (this config: a global batch of 16)" in refused.stderr
    assert "give the config of the attempt that trained steps 1-4" in refused.stderr
    # a restart of the finished run evaluated its final checkpoint again: a second valid line for step 6
    run_cli(["pretrain", write_config(tmp_path / "b.yaml", cfg)])
    evaluated = [r["step"] for r in read_metrics(tmp_path / "run") if "valid_loss" in r]
    assert evaluated == [4, 6]


def test_a_warmup_spanning_the_run_is_warned():
    from ds_train.train.schedule import warmup_note

    t = SimpleNamespace(max_steps=100, warmup_steps=99, schedule="cosine")
    assert warmup_note(t) is None and warmup_note(SimpleNamespace(**{**vars(t), "warmup_steps": 0})) is None
    assert warmup_note(SimpleNamespace(**{**vars(t), "warmup_steps": 100})) == (
        "train.warmup_steps=100 spans the whole run (train.max_steps=100): the cosine schedule never decays"
    )
    assert warmup_note(SimpleNamespace(**{**vars(t), "warmup_steps": 400})).endswith(
        "and the learning rate peaks at 0.25 × train.lr"
    )
    wsd = SimpleNamespace(max_steps=100, warmup_steps=90, schedule="wsd", decay_steps=None)
    assert (
        warmup_note(wsd)
        == "the wsd cooldown of 20 steps is cut to 10: it starts where train.warmup_steps ends"
    )
    assert warmup_note(SimpleNamespace(**{**vars(wsd), "warmup_steps": 80})) is None


def _order(config, start: int, steps: int) -> str:
    from tests.helpers import run_cli

    return run_cli(["data", "order", config, "--start-step", start, "--steps", steps, "--json"]).stdout


def _state(run_dir, step: int) -> dict:
    import json

    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "ds_train_state.json").read_text())


@pytest.mark.slow
def test_a_forced_resume_on_other_data_reads_it_from_its_beginning(tmp_path, shards):
    """An anneal on a new mix entered it at step × batch: a pass skipped its first rows (pretraining audit)."""
    from tests.helpers import base_config, run_cli, write_config

    cfg = base_config(tmp_path / "run", shards, train={"max_steps": 3, "save_every": 3})
    run_cli(["pretrain", write_config(tmp_path / "a.yaml", cfg)])
    cfg["data"]["train"] = str(shards / "valid")
    cfg["train"]["max_steps"] = 5
    cfg["run"]["force_resume"] = True
    proc = run_cli(["pretrain", write_config(tmp_path / "b.yaml", cfg)])
    assert "the data stream is new: it starts at its beginning from step 4 on" in proc.stderr
    assert _state(tmp_path / "run", 5)["data"]["consumed_samples"] == 2 * 8
    # `ds-train data order` on the run: steps 4-5 (the anneal's) read the new data's first batches
    annealed = [json.loads(x)["samples"] for x in _order(tmp_path / "b.yaml", 4, 2).splitlines()]
    cfg["run"]["output_dir"] = str(tmp_path / "fresh")
    fresh = [
        json.loads(x)["samples"] for x in _order(write_config(tmp_path / "r.yaml", cfg), 1, 2).splitlines()
    ]
    assert annealed == fresh
    refused = run_cli(["data", "show", tmp_path / "b.yaml", "--step", 3], check=False)
    assert refused.returncode == 2 and "step 3 was trained on other data than this config's" in refused.stderr
    cfg["run"]["output_dir"] = str(tmp_path / "run")
    # a later resume of the same data continues its stream
    cfg["train"]["max_steps"] = 6
    again = run_cli(["pretrain", write_config(tmp_path / "b.yaml", cfg)])
    assert "the data stream" not in again.stderr
    assert _state(tmp_path / "run", 6)["data"]["consumed_samples"] == 3 * 8


def test_no_warmup_for_a_fresh_model_is_warned(tmp_path, shards):
    """A model trained from scratch with train.warmup_steps=0 (pretraining audit: accepted silently)."""
    from ds_train.config import load_config
    from ds_train.train.epochs import steps_line
    from tests.helpers import base_config, write_config

    cfg_file = write_config(tmp_path / "c.yaml", base_config(tmp_path / "run", shards))
    assert "warning" not in steps_line(load_config(cfg_file))  # warmup_steps=2
    cold = steps_line(load_config(cfg_file, ["train.warmup_steps=0"]))
    assert cold.endswith(
        "warning: train.warmup_steps=0 for a model trained from scratch: most recipes warm up over 1-2% of the run"
    )
    assert "warning" not in steps_line(
        load_config(cfg_file, ["train.warmup_steps=0", "train.schedule=constant"])
    )


@pytest.mark.slow
def test_the_embedding_decay_choice_is_recorded_and_kept(tmp_path, shards):
    from tests.helpers import base_config, run_cli, write_config

    cfg = base_config(tmp_path / "run", shards, train={"max_steps": 1, "embedding_weight_decay": False})
    run_cli(["pretrain", write_config(tmp_path / "a.yaml", cfg)])
    assert _state(tmp_path / "run", 1)["decay_embeddings"] is False
    cfg["train"].update(max_steps=2, embedding_weight_decay=True)
    proc = run_cli(["pretrain", write_config(tmp_path / "b.yaml", cfg)], check=False)
    assert proc.returncode == 2 and "train.embedding_weight_decay=false (this run: true)" in proc.stderr
