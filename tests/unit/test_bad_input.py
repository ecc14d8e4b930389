"""Bad input: each malformed config or run dir is one line on stderr, exit status 2, no traceback,
no process group, and nothing written to the run directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist

from ds_train.cli import main
from tests.helpers import MICRO_LLAMA, REPO, TOKENIZER, base_config, write_config


def _set(raw: dict, dotted: str, value) -> None:
    section, key = dotted.split(".")
    if value is _DELETE:
        raw[section].pop(key, None)
    else:
        raw.setdefault(section, {})[key] = value


_DELETE = object()

# (id, config edits, command-line overrides, expected text in the one-line error)
CASES = [
    (
        "unknown-key",
        {},
        ["train.max_step=5"],
        "unknown config key 'train.max_step' (did you mean 'train.max_steps'?)",
    ),
    ("key-in-wrong-section", {}, ["train.seed=1"], "did you mean 'run.seed'?"),
    ("unknown-section", {"optimizer": {"lr": 1}}, [], "unknown config section 'optimizer'"),
    ("int-type", {}, ["train.max_steps=ten"], "train.max_steps: expected an integer"),
    ("float-type", {"train.lr": "fast"}, [], "train.lr: expected a number"),
    ("bool-type", {}, ["run.tensorboard=maybe"], "run.tensorboard: expected true or false"),
    ("stage-choice", {}, ["zero.stage=5"], "zero.stage: 5 is not one of 0, 1, 2, 3"),
    ("precision-choice", {}, ["train.precision=fp8"], "train.precision: 'fp8' is not one of"),
    ("missing-output-dir", {"run.output_dir": _DELETE}, [], "missing required key 'run.output_dir'"),
    ("infinite-lr", {}, ["train.lr=inf"], "train.lr: expected a finite number, got 'inf'"),
    (
        "export-without-final-checkpoint",
        {},
        ["train.export_hf=true", "train.save_final=false"],
        "train.export_hf converts the final checkpoint, which train.save_final=false does not write",
    ),
    (
        "fp32-grads-at-stage-1",
        {},
        ["train.grad_dtype=fp32", "train.precision=bf16", "zero.stage=1"],
        "train.grad_dtype=fp32 needs zero.stage 2 or 3 (got 1)",
    ),
    (
        "keep-every-without-its-checkpoints",
        {},
        ["train.keep_every=3", "train.save_every=2"],
        "make it a multiple of train.save_every (2)",
    ),
    (
        "decay-steps-without-wsd",
        {},
        ["train.decay_steps=5"],
        "train.decay_steps only applies to train.schedule wsd",
    ),
    (
        "flat-key-from-hf",
        {"learning_rate": 1e-3},
        [],
        "unknown config section 'learning_rate' (did you mean 'train.lr'?)",
    ),
    (
        "masked-lm-without-mask-token",
        {},
        ["model.objective=masked_lm"],
        "model.objective=masked_lm needs a tokenizer with a mask token",
    ),
    ("missing-max-steps", {"train.max_steps": _DELETE}, [], "missing required key 'train.max_steps'"),
    ("missing-train-data", {"data.train": _DELETE}, [], "missing required key 'data.train'"),
    (
        "batch-not-multiple",
        {},
        ["train.global_batch_size=10", "train.micro_batch_size=4"],
        "not a multiple of train.micro_batch_size=4",
    ),
    (
        "batch-vs-world",
        {},
        ["train.global_batch_size=8", "train.micro_batch_size=2", "WORLD_SIZE=3"],
        "8 / (2 × 3) = 1.33333",
    ),
    ("model-config-missing", {}, ["model.config=/nonexistent/model.json"], "model.config: file not found"),
    ("model-both", {}, [f"model.init_from={REPO}"], "set exactly one of 'model.config'"),
    ("model-neither", {"model.config": _DELETE}, [], "set exactly one of 'model.config'"),
    ("tokenizer-missing", {}, ["model.tokenizer=/nonexistent/tok"], "model.tokenizer: directory not found"),
    ("tokenizer-empty", {}, ["model.tokenizer=EMPTY_DIR"], "no tokenizer files"),
    ("offload-param-stage2", {}, ["zero.stage=2", "zero.offload_param=cpu"], "needs zero.stage=3"),
    ("offload-optimizer-stage0", {}, ["zero.stage=0", "zero.offload_optimizer=cpu"], "needs zero.stage ≥ 1"),
    (
        "nvme-without-path",
        {},
        ["zero.stage=3", "zero.offload_param=nvme"],
        "NVMe offload needs 'zero.nvme_path'",
    ),
    (
        "nvme-path-missing",
        {},
        ["zero.stage=3", "zero.offload_param=nvme", "zero.nvme_path=/nonexistent"],
        "zero.nvme_path: directory not found",
    ),
    ("negative-lr", {}, ["train.lr=-1"], "train.lr must be > 0"),
    ("min-lr-ratio", {}, ["train.min_lr_ratio=2"], "train.min_lr_ratio must be within [0, 1]"),
    ("adam-beta1", {}, ["train.adam_beta1=1.5"], "train.adam_beta1 must be within [0, 1)"),
    ("adam-beta2", {}, ["train.adam_beta2=1"], "train.adam_beta2 must be within [0, 1)"),
    ("adam-eps", {}, ["train.adam_eps=-1"], "train.adam_eps must be ≥ 0"),
    ("zero-preset", {}, ["zero.preset=stage7"], "zero.preset 'stage7' not found"),
    (
        "no-shards",
        {},
        ["data.train=/nonexistent/shards"],
        "data.train: no shard manifest at /nonexistent/shards/index.json",
    ),
    ("bad-source-weight", {"data.train": [{"path": "x", "weight": -1}]}, [], "weight must be > 0"),
    (
        "text-source-weight",
        {"data.train": [{"path": "x", "weight": "abc"}]},
        [],
        "weight must be > 0 (a number)",
    ),
    (
        "starved-source-weight",
        {},
        ["data.train=[{path: SHARDS/train, weight: 1}, {path: SHARDS/valid, weight: 0.00001}]"],
        "SHARDS/valid: weight 1e-05 (a share of 1e-05) gets no sample in a mixing period of 10000",
    ),
    ("override-syntax", {}, ["train.max_steps"], "must look like section.key=value"),
    ("negative-log-every", {}, ["train.log_every=0"], "train.log_every must be > 0"),
    ("negative-gc-every", {}, ["train.gc_every=-1"], "train.gc_every must be ≥ 0"),
    ("straggler-ratio", {}, ["train.straggler_ratio=0.9"], "train.straggler_ratio must be > 1 (or 0"),
    ("profile-start", {}, ["profile.start_step=-1"], "profile.start_step must be ≥ 0"),
    ("profile-steps", {}, ["profile.start_step=3", "profile.steps=0"], "profile.steps must be ≥ 1"),
    (
        "profile-warmup-room",
        {},
        ["profile.start_step=2", "profile.warmup_steps=2"],
        "leaves no room for profile.warmup_steps=2 before it: set start_step ≥ 3",
    ),
    (
        "profile-past-end",
        {},
        ["profile.start_step=5", "profile.steps=2"],
        "profile window steps 5-6 must end before train.max_steps=6",
    ),
    (
        "profile-ranks",
        {},
        ["profile.start_step=3", "profile.ranks=first"],
        "profile.ranks must be 'all' or a list",
    ),
    ("mlm-probability", {}, ["data.mlm_probability=1.5"], "data.mlm_probability must be within (0, 1)"),
    ("collective-timeout", {}, ["run.collective_timeout_s=0"], "run.collective_timeout_s must be > 0"),
    (
        "nonfinite-skip-without-zero",
        {},
        ["train.nonfinite=skip", "zero.stage=0"],
        "train.nonfinite=skip needs zero.stage ≥ 1",
    ),
    ("force-resume-type", {}, ["run.force_resume=sometimes"], "run.force_resume: expected true or false"),
    (
        "checkpointing-more-layers-than-the-model",
        {},
        ["model.activation_checkpointing=true", "model.activation_checkpointing_layers=3"],
        "model.activation_checkpointing_layers=3 but the model config has 2 layers",
    ),
]


@pytest.mark.parametrize(
    ("edits", "overrides", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_config_is_one_line_and_writes_nothing(
    tmp_path, shards, capsys, monkeypatch, edits, overrides, expected
):
    raw = base_config(tmp_path / "run", shards)
    for key, value in edits.items():
        if "." in key:
            _set(raw, key, value)
        else:
            raw[key] = value
    (tmp_path / "empty").mkdir()
    overrides = [o.replace("EMPTY_DIR", str(tmp_path / "empty")) for o in overrides]
    overrides = [o.replace("SHARDS", str(shards)) for o in overrides]
    expected = expected.replace("SHARDS", str(shards))
    for o in [o for o in overrides if o.startswith("WORLD_SIZE=")]:
        monkeypatch.setenv("WORLD_SIZE", o.split("=")[1])
        monkeypatch.setenv("RANK", "0")
        overrides.remove(o)
    cfg = write_config(tmp_path / "run.yaml", raw)
    code = main(["pretrain", str(cfg), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("ds-train: error: ") and "\n" not in err, err
    assert expected in err, err
    assert "Traceback" not in err
    assert not dist.is_initialized()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags", [["--check"], []], ids=["check", "start"])
@pytest.mark.parametrize("exists", [True, False], ids=["existing", "to-create"])
def test_unwritable_output_dir_is_one_line(tmp_path, shards, capsys, monkeypatch, flags, exists):
    # A read-only mount refuses even root, which chmod cannot show in a test: os.access is what the
    # check asks, so it answers here as it does on a read-only mount
    from ds_train.train import output_dir

    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(output_dir.os, "access", lambda p, mode: Path(p) != ro and real_access(p, mode))
    run_dir = ro if exists else ro / "runs" / "a"
    cfg = write_config(tmp_path / "run.yaml", base_config(run_dir, shards))
    assert main(["pretrain", str(cfg), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ds-train: error: run.output_dir ") and "\n" not in err, err
    assert "not writable" in err
    assert not dist.is_initialized()


def test_missing_or_invalid_config_file(tmp_path, capsys):
    assert main(["pretrain", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    assert main(["pretrain", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def _fake_checkpoint(run_dir: Path, model_config: dict, step: int = 5) -> Path:
    ckpt = run_dir / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "ds_train_state.json").write_text(
        json.dumps({"step": step, "model_config": model_config, "world_size": 1, "global_batch_size": 8})
    )
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name)
    (run_dir / "config.yaml").write_text("original: true\n")
    return ckpt


def _snapshot(d: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


def test_run_dir_with_another_models_checkpoint_is_refused(tmp_path, shards, capsys):
    from ds_train.checkpoint.compat import model_signature
    from ds_train.config import load_config
    from ds_train.model.build import load_hf_config, load_tokenizer

    raw = base_config(tmp_path / "run", shards)
    cfg = load_config(write_config(tmp_path / "run.yaml", raw))
    sig = model_signature(load_hf_config(cfg.model, load_tokenizer(cfg.model)))
    other = {**sig, "hidden_size": sig["hidden_size"] * 2, "num_hidden_layers": 7}
    _fake_checkpoint(tmp_path / "run", other)
    before = _snapshot(tmp_path / "run")
    assert main(["pretrain", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a checkpoint (step 5) of a different model" in err and "hidden_size: 64 → 32" in err, err
    assert "\n" not in err
    assert _snapshot(tmp_path / "run") == before
    assert not dist.is_initialized()

    # run.resume=never refuses any existing checkpoint, same model or not
    _fake_checkpoint(tmp_path / "run2", sig)
    assert (
        main(
            [
                "pretrain",
                str(tmp_path / "run.yaml"),
                f"run.output_dir={tmp_path / 'run2'}",
                "run.resume=never",
            ]
        )
        == 2
    )
    assert "already holds checkpoints" in capsys.readouterr().err


def test_check_flag_reports_the_batch_layout(tmp_path, shards, capsys):
    cfg = write_config(tmp_path / "run.yaml", base_config(tmp_path / "run", shards))
    assert main(["pretrain", str(cfg), "--check"]) == 0
    assert "8 = 2 micro × 4 accum × 1 ranks" in capsys.readouterr().out
    # from a login node, for the job's world size
    assert main(["pretrain", str(cfg), "--check", "--world-size", "2"]) == 0
    assert "8 = 2 micro × 2 accum × 2 ranks" in capsys.readouterr().out
    assert main(["pretrain", str(cfg), "--check", "--world-size", "3"]) == 2
    assert "8 / (2 × 3)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _with_tokenizer_sha(shard_dir: Path, into: Path, sha: str) -> Path:
    """A copy of a shard set whose manifest says it was tokenized by another tokenizer."""
    import shutil

    shutil.copytree(shard_dir, into)
    index = json.loads((into / "index.json").read_text())
    index["tokenizer"]["sha256"] = sha
    (into / "index.json").write_text(json.dumps(index))
    return into


def test_check_flag_runs_the_checks_a_start_makes_after_its_preflight(tmp_path, shards, capsys, monkeypatch):
    """`--check` reads the shard manifests and asks what this machine offers, as a start does
    before training: each problem is the start's one line, exit 2, nothing written."""
    import torch

    raw = base_config(tmp_path / "run", shards)
    cfg = str(write_config(tmp_path / "run.yaml", raw))
    other_tok = _with_tokenizer_sha(shards / "valid", tmp_path / "valid_other", "0" * 64)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for overrides, expected in (
        ([f"data.valid={other_tok}"], "data.valid was tokenized with another tokenizer"),
        (["model.attn_implementation=flex_attention"], "flex_attention needs a CUDA GPU"),
    ):
        assert main(["pretrain", cfg, *overrides, "--check"]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err, err
    # rows longer than a model's learned positions (GPT-2's n_positions) are refused; a rotary
    # model's max_position_embeddings is only warned about
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_text(
        json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 16})
    )
    assert main(["pretrain", cfg, f"model.config={gpt2}", "--check"]) == 2
    err = capsys.readouterr().err
    assert "is 32 tokens but the model has 16 learned positions" in err, err
    llama = tmp_path / "llama.json"
    llama.write_text(json.dumps({**json.loads(MICRO_LLAMA.read_text()), "max_position_embeddings": 16}))
    assert main(["pretrain", cfg, f"model.config={llama}", "--check"]) == 0
    assert not (tmp_path / "run").exists()
    # a checkpoint of this model trained on another data stream: refused by --check, let through
    # by run.force_resume
    from ds_train.checkpoint.compat import model_signature
    from ds_train.config import load_config
    from ds_train.model.build import load_hf_config, load_tokenizer

    loaded = load_config(cfg)
    sig = model_signature(load_hf_config(loaded.model, load_tokenizer(loaded.model)))
    ckpt = _fake_checkpoint(tmp_path / "run", sig)
    state = json.loads((ckpt / "ds_train_state.json").read_text())
    state["data"] = {"fingerprint": "0" * 64, "seq_len": 32, "seed": raw["run"].get("seed", 0)}
    (ckpt / "ds_train_state.json").write_text(json.dumps(state))
    before = _snapshot(tmp_path / "run")
    assert main(["pretrain", cfg, "--check"]) == 2
    err = capsys.readouterr().err
    assert "a different shard set" in err and "run.force_resume=true" in err, err
    assert main(["pretrain", cfg, "run.force_resume=true", "--check"]) == 0
    assert f"resumes from {ckpt}" in capsys.readouterr().out
    assert _snapshot(tmp_path / "run") == before and not dist.is_initialized()


def test_valid_rows_longer_than_the_models_positions_are_refused_before_start(
    tmp_path, shards, corpus, capsys
):
    """data.valid's rows may be longer than data.train's: they were not checked, so --check passed
    and the first evaluation died with a bare IndexError inside the model (data audit)."""
    from transformers import AutoTokenizer

    from ds_train.data.sharding import ShardOptions, shard_corpus

    long_rows = tmp_path / "long"
    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    shard_corpus([str(corpus)], long_rows, tok, ShardOptions(seq_len=64, valid_fraction=0.0, progress=False))
    gpt2 = tmp_path / "gpt2.json"  # 48 positions: train's 32-token rows fit, valid's 64 do not
    gpt2.write_text(
        json.dumps({"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 48})
    )
    cfg = str(write_config(tmp_path / "run.yaml", base_config(tmp_path / "run", shards)))
    assert main(["pretrain", cfg, f"model.config={gpt2}", "--check"]) == 0
    capsys.readouterr()
    assert (
        main(["pretrain", cfg, f"model.config={gpt2}", f"data.valid={long_rows / 'train'}", "--check"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "a row of data.valid" in err and "is 64 tokens but the model has 48 learned positions" in err, err


def test_an_encoder_config_is_made_a_decoder_for_causal_lm(tmp_path, shards, caplog):
    """model.objective=causal_lm with a BERT config built BertLMHeadModel attending both ways: each
    target token was among its inputs (the loss fell; the model could not generate), and only
    transformers' hint said so (cloud-user audit). The config is made a decoder, with a warning."""
    import torch

    from ds_train.config import load_config
    from ds_train.model.build import build_model
    from ds_train.train.pretrain import preflight

    raw = base_config(tmp_path / "run", shards)
    raw["model"]["config"] = str(REPO / "configs/model/tiny-bert.json")
    cfg = load_config(write_config(tmp_path / "run.yaml", raw))
    pre = preflight(cfg)
    assert pre.hf_config.is_decoder and "made a decoder (is_decoder=True)" in caplog.text
    model = build_model(cfg.model, pre.hf_config, seed=0, rank=0).eval()
    ids = torch.randint(5, 200, (1, 12))
    changed = ids.clone()
    changed[0, 10] = 4
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    assert torch.equal(a[0, :10], b[0, :10])  # no position sees a later token
    assert not torch.equal(a[0, 10], b[0, 10])
    llama = preflight(load_config(write_config(tmp_path / "l.yaml", base_config(tmp_path / "l", shards))))
    assert not getattr(llama.hf_config, "is_decoder", False)  # decoder architectures are left alone


def test_a_zero_stage_deepspeed_cannot_load_is_refused_before_start(tmp_path, shards, capsys):
    """A ZeRO-2 checkpoint resumed at ZeRO-3 (or 0) died in DeepSpeed's loader with an
    AssertionError on every rank after start-up, and --check said ok (cloud-user audit). Stages 1
    and 2 load each other's checkpoints; 0 and 3 only their own."""
    from tests.helpers import state_only_checkpoint

    cfg = write_config(tmp_path / "run.yaml", base_config(tmp_path / "run", shards))
    state_only_checkpoint(cfg, 4, zero_stage=2, world_size=1, global_batch_size=8)
    for stage in (3, 0):
        assert main(["pretrain", str(cfg), f"zero.stage={stage}", "--check"]) == 2
        err = capsys.readouterr().err.strip()
        assert (
            f"written with ZeRO-2, which DeepSpeed cannot load at ZeRO-{stage}" in err and "\n" not in err
        ), err
        assert main(["pretrain", str(cfg), f"zero.stage={stage}", "run.force_resume=true", "--check"]) == 2
        capsys.readouterr()
    for stage in (1, 2):
        assert main(["pretrain", str(cfg), f"zero.stage={stage}", "--check"]) == 0, capsys.readouterr().err


def test_a_resume_with_the_other_embedding_decay_is_refused_before_start(tmp_path, shards, capsys):
    """train.embedding_weight_decay moves the embedding tables between the optimizer's parameter
    groups, whose state DeepSpeed stores group by group."""
    from tests.helpers import state_only_checkpoint

    cfg = write_config(tmp_path / "run.yaml", base_config(tmp_path / "run", shards))
    state_only_checkpoint(cfg, 4, zero_stage=2, world_size=1, global_batch_size=8, decay_embeddings=False)
    assert main(["pretrain", str(cfg), "train.embedding_weight_decay=false", "--check"]) == 0, (
        capsys.readouterr()
    )
    capsys.readouterr()
    assert main(["pretrain", str(cfg), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.embedding_weight_decay=false (this run: true)" in err and "\n" not in err, err
