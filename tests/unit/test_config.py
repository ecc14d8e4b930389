"""Config loading: overrides, types, presets, and one-line errors that name the key."""

from __future__ import annotations

import dataclasses

import pytest

from ds_train.config import ConfigError, describe, load_config, validate
from ds_train.config.loader import all_keys
from ds_train.config.schema import SECTIONS
from ds_train.distributed.deepspeed_config import batch_layout
from tests.helpers import REPO, base_config, write_config


@pytest.fixture
def cfg_file(tmp_path, shards):
    return write_config(tmp_path / "run.yaml", base_config(tmp_path / "run", shards))


@pytest.fixture
def no_zero_file(tmp_path, shards):
    raw = base_config(tmp_path / "run", shards)
    del raw["zero"]
    return write_config(tmp_path / "run-no-zero.yaml", raw)


def test_overrides_are_typed_and_win(cfg_file):
    cfg = load_config(
        cfg_file, ["train.max_steps=20", "zero.stage=3", "train.lr=3e-4", "run.tensorboard=true"]
    )
    assert cfg.train.max_steps == 20 and cfg.zero.stage == 3
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.run.tensorboard is True


def test_text_settings_take_the_override_as_written(cfg_file):
    """YAML made `run.name=2024` a number (refused) and cut `#` as a comment (sweep audit)."""
    cfg = load_config(cfg_file, ["run.name=2024", "run.wandb_project=sweep #3", "finetune.label_field=true"])
    assert (cfg.run.name, cfg.run.wandb_project, cfg.finetune.label_field) == ("2024", "sweep #3", "true")
    cfg = load_config(cfg_file, ["run.name=null", "finetune.text_pair_field='0'"])
    assert cfg.run.name is None and cfg.finetune.text_pair_field == "0"
    assert load_config(cfg_file, ["train.max_steps=7 # a comment"]).train.max_steps == 7  # other types: YAML


def test_every_alias_names_a_setting():
    from ds_train.config.aliases import ALIASES

    keys = set(all_keys())
    assert {target.split(" ")[0] for target in ALIASES.values()} <= keys
    assert not {name for name in ALIASES if name in {k.split(".")[1] for k in keys}}  # none is a real key


def test_yaml_float_quirk_accepted(tmp_path, shards):
    raw = base_config(tmp_path / "run", shards)
    raw["train"]["lr"] = "3e-4"  # what PyYAML gives for `lr: 3e-4`
    cfg = load_config(write_config(tmp_path / "c.yaml", raw))
    assert cfg.train.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_step=5", "unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"),
        ("train.seed=5", "unknown config key 'train.seed' (did you mean 'run.seed'?)"),
        ("trian.lr=1", "unknown config section 'trian' (did you mean 'train'?)"),
        ("zero.stage=4", "zero.stage: 4 is not one of 0, 1, 2, 3"),
        ("train.max_steps=ten", "train.max_steps: expected an integer, got 'ten'"),
        ("train.precision=bf61", "train.precision: 'bf61' is not one of"),
        ("run.tensorboard=maybe", "run.tensorboard: expected true or false"),
        # other stacks' names (sweep audit): spelling distance finds none of these
        ("train.learning_rate=1", "'train.learning_rate' (did you mean 'train.lr'?)"),
        ("train.eval_interval=5", "(did you mean 'train.eval_every'?)"),
        ("train.num_train_epochs=2", "(did you mean 'train.epochs'?)"),
        ("zero.gradient_clipping=1", "(did you mean 'train.grad_clip'?)"),
        (
            "train.gradient_accumulation_steps=4",
            "(did you mean 'train.global_batch_size' (= micro_batch_size × accumulation × ranks)?)",
        ),
    ],
)
def test_bad_keys_and_types_name_the_key(cfg_file, override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_preset_gives_defaults_and_explicit_keys_win(no_zero_file, cfg_file):
    cfg = load_config(no_zero_file, ["zero.preset=stage3-offload-all"])
    assert (cfg.zero.stage, cfg.zero.offload_param, cfg.zero.offload_optimizer) == (3, "cpu", "cpu")
    cfg = load_config(no_zero_file, ["zero.preset=stage2-offload-optimizer", "zero.offload_optimizer=none"])
    assert (cfg.zero.stage, cfg.zero.offload_optimizer) == (2, "none")
    # a key set in the run config wins over the preset, and a contradiction is reported
    cfg = load_config(cfg_file, ["zero.preset=stage3-offload-all"])
    assert cfg.zero.stage == 2
    with pytest.raises(ConfigError, match="zero.offload_param=cpu needs zero.stage=3"):
        validate(cfg)
    with pytest.raises(ConfigError, match="zero.preset 'stage9' not found"):
        load_config(no_zero_file, ["zero.preset=stage9"])


def test_every_preset_loads_and_validates(no_zero_file, tmp_path):
    from ds_train.config.loader import repo_configs_dir

    presets = sorted((repo_configs_dir() / "zero").glob("*.yaml"))
    assert {"stage0", "stage1", "stage2", "stage3", "stage3-offload-all", "stage3-nvme"} <= {
        p.stem for p in presets
    }
    for preset in presets:
        cfg = load_config(no_zero_file, [f"zero.preset={preset.stem}", f"zero.nvme_path={tmp_path}"])
        validate(cfg)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.activation_checkpointing_layers=2"], "but model.activation_checkpointing is false"),
        (
            ["model.activation_checkpointing=true", "model.activation_checkpointing_layers=-1"],
            "activation_checkpointing_layers must be ≥ 0",
        ),
    ],
)
def test_partial_checkpointing_is_checked(cfg_file, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        validate(load_config(cfg_file, overrides))
    validate(
        load_config(
            cfg_file, ["model.activation_checkpointing=true", "model.activation_checkpointing_layers=2"]
        )
    )


def test_compile_is_refused_under_zero3_only(cfg_file):
    with pytest.raises(ConfigError, match="model.compile with zero.stage=3"):
        validate(load_config(cfg_file, ["model.compile=true", "zero.stage=3"]))
    for stage in (0, 1, 2):
        validate(load_config(cfg_file, ["model.compile=true", f"zero.stage={stage}"]))
    validate(load_config(cfg_file, ["zero.stage=3"]))


def test_pad_vocab_multiple_is_refused_with_init_from(cfg_file, tmp_path):
    """It only shapes a model built from model.config; with init_from it was silently ignored."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}')
    base = [
        "model.config=null",
        f"model.init_from={hf}",
        f"model.tokenizer={REPO}/configs/tokenizers/stdlib-bpe-4k",
    ]
    validate(load_config(cfg_file, base))
    with pytest.raises(ConfigError, match="pad_vocab_multiple applies to a model built from model.config"):
        validate(load_config(cfg_file, [*base, "model.pad_vocab_multiple=64"]))


def test_batch_arithmetic_error_shows_the_numbers(cfg_file):
    cfg = load_config(cfg_file, ["train.global_batch_size=12", "train.micro_batch_size=2"])
    with pytest.raises(ConfigError) as e:
        batch_layout(cfg.train, 4)
    assert "12 / (2 × 4) = 1.5" in str(e.value)
    layout = batch_layout(cfg.train, 2)
    assert (layout.grad_accum, layout.per_rank) == (3, 6)


def test_paths_are_made_absolute(tmp_path, shards, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = base_config("relative/run", shards)
    cfg = load_config(write_config(tmp_path / "c.yaml", raw))
    assert cfg.run.output_dir == str(tmp_path / "relative" / "run")


def test_describe_documents_every_key():
    text = describe()
    for key in all_keys():
        assert f"  {key.split('.')[1]}:" in text
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no documentation"


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_output_dir_is_refused(cfg_file, value):
    # `run.output_dir=$OUT` with OUT unset: the run wrote into the current directory
    with pytest.raises(ConfigError, match=r"required key 'run.output_dir' is empty"):
        validate(load_config(cfg_file, [f"run.output_dir={value}"]))


def test_empty_data_train_entry_is_refused(cfg_file):
    with pytest.raises(ConfigError, match="data.train"):
        validate(load_config(cfg_file, ["data.train=' '"]))


@pytest.mark.parametrize(
    "override", ["train.lr=inf", "train.lr=.inf", "train.grad_clip=nan", "train.peak_flops=-inf"]
)
def test_non_finite_numbers_are_refused(cfg_file, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file, [override])
    assert str(e.value).startswith(f"{key}: expected a finite number") and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "gradient_accumulation_steps=4",
            "gradient_accumulation_steps: ds_train sets this from train.global_batch_size",
        ),
        ("train_batch_size=64", "train_batch_size: ds_train sets this from train.global_batch_size"),
        ("train_micro_batch_size_per_gpu=1", "from train.micro_batch_size"),
        ("zero_optimization.stage=1", "zero_optimization.stage: ds_train sets this from zero.stage"),
        ("zero_optimization.offload_param.device=cpu", "from zero.offload_param"),
        ("zero_optimization.offload_optimizer={device: cpu}", "from zero.offload_optimizer"),
        ("zero_optimization=3", "zero_optimization: ds_train sets this from zero.stage"),
        ("bf16.enabled=true", "from train.precision"),
        ("fp16={enabled: true}", "from train.precision"),
        ("gradient_clipping=0.5", "from train.grad_clip"),
        ("optimizer.params.lr=0.1", "from train.lr"),
        ("optimizer.type=Lamb", "optimizer.type: ds_train sets this"),
        ("scheduler.type=WarmupLR", "scheduler: ds_train sets this from train.schedule"),
        # tuning keys with a zero.* setting: the override won over it, and plan read the setting
        ("zero_optimization.reduce_bucket_size=1000", "from zero.reduce_bucket_size; set that instead"),
        ("zero_optimization.overlap_comm=false", "from zero.overlap_comm"),
        ("zero_optimization.prefetch_bucket_size=10", "from zero.stage3_prefetch_bucket_size"),  # alias
        ("zero_optimization.stage3_max_live_parameters=10", "from zero.stage3_max_live_parameters"),
    ],
)
def test_ds_config_overrides_of_derived_keys_are_refused(cfg_file, override, expected):
    with pytest.raises(ConfigError) as e:
        validate(load_config(cfg_file, [f"zero.ds_config_overrides.{override}"]))
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override",
    [
        "zero_optimization.sub_group_size=1000000",
        "zero_optimization.round_robin_gradients=true",
        "aio.queue_depth=16",
        "optimizer.params.fused=false",
        "timers.throughput.enabled=true",
        "fp16.loss_scale_window=500",
    ],
)
def test_ds_config_overrides_of_tuning_keys_are_kept(cfg_file, override):
    validate(load_config(cfg_file, [f"zero.ds_config_overrides.{override}"]))
