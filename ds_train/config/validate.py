"""Checks a Config beyond types: required keys, paths, ranges and contradictions.

Everything here runs before any process group starts or any file is written, so a bad config
costs the user one line of output and nothing else.
"""

from __future__ import annotations

import math
from pathlib import Path

from ds_train.config.batch_ramp import check_ramp
from ds_train.config.ds_overrides import check_ds_config_overrides
from ds_train.config.loader import ConfigError
from ds_train.config.schema import Config

REQUIRED_KEYS = ("run.output_dir", "train.max_steps", "train.global_batch_size", "train.micro_batch_size")


def validate(cfg: Config, *, needs_train_data: bool = True) -> None:
    """Raise ConfigError (one line) for the first problem found."""
    epochs = cfg.train.epochs
    # (a preflight run again after resolving epochs finds both: its own max_steps, not the user's)
    if (
        epochs is not None
        and cfg.train.max_steps is not None
        and not getattr(cfg.train, "from_epochs", False)
    ):
        raise ConfigError(
            f"set one of train.max_steps ({cfg.train.max_steps}) and train.epochs ({epochs}), not both"
        )
    if epochs is not None and not (isinstance(epochs, (int, float)) and 0 < epochs < math.inf):
        raise ConfigError(f"train.epochs must be a number > 0, got {epochs!r}")
    for key in REQUIRED_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None and key == "train.max_steps" and epochs is not None:
            continue  # resolved from the data by the preflight (train/epochs.py)
        if value is None:
            alternative = " (or train.epochs)" if key == "train.max_steps" else ""
            raise ConfigError(f"missing required key '{key}'{alternative}")
        if isinstance(value, str) and not value.strip():
            # `run.output_dir=$OUT` with OUT unset: an empty path would mean the current directory
            raise ConfigError(f"required key '{key}' is empty (an unset shell variable?)")
    if cfg.run.start_from is not None and not str(cfg.run.start_from).strip():
        # `run.start_from=$CKPT` with CKPT unset would start a fresh model where a branch was meant
        raise ConfigError("run.start_from is empty (an unset shell variable?)")
    if needs_train_data:
        train = cfg.data.train
        if train in (None, "", []):
            raise ConfigError("missing required key 'data.train' (a shard directory, pattern or URL)")
        if any(isinstance(t, str) and not t.strip() for t in (train if isinstance(train, list) else [train])):
            raise ConfigError("data.train has an empty entry (an unset shell variable?)")
    _check_model(cfg)
    _check_downstream(cfg)
    _check_train(cfg)
    _check_zero(cfg)
    _check_profile(cfg)


def _check_downstream(cfg: Config) -> None:
    d = cfg.data
    if not isinstance(d.downstream, list) or not all(isinstance(p, str) and p.strip() for p in d.downstream):
        raise ConfigError(f"data.downstream must be a list of JSON-lines files, got {d.downstream!r}")
    if d.downstream and cfg.model.objective != "causal_lm":
        raise ConfigError(
            "data.downstream scores choices by next-token log-likelihood: model.objective=causal_lm only"
        )
    missing = [p for p in d.downstream if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"data.downstream: no such file {missing[0]}")
    if not isinstance(d.downstream_max_examples, int) or d.downstream_max_examples < 0:
        raise ConfigError(
            f"data.downstream_max_examples must be an integer >= 0, got {d.downstream_max_examples!r}"
        )


def _check_model(cfg: Config) -> None:
    m = cfg.model
    if (m.config is None) == (m.init_from is None):
        raise ConfigError(
            "set exactly one of 'model.config' (build fresh from an HF config JSON) "
            "and 'model.init_from' (start from an HF model directory)"
        )
    if m.config is not None and not Path(m.config).is_file():
        raise ConfigError(f"model.config: file not found: {m.config}")
    if m.init_from is not None and not (Path(m.init_from) / "config.json").is_file():
        raise ConfigError(f"model.init_from: no config.json in {m.init_from}")
    if m.init_from is not None and m.pad_vocab_multiple != 1:
        raise ConfigError(
            "model.pad_vocab_multiple applies to a model built from model.config; a model from "
            "model.init_from keeps its trained embedding size"
        )
    tokenizer = m.tokenizer or m.init_from
    if tokenizer is None:
        raise ConfigError(
            "missing 'model.tokenizer': a model built from model.config needs a local tokenizer directory"
        )
    tok = Path(tokenizer)
    if not tok.is_dir():
        raise ConfigError(f"model.tokenizer: directory not found: {tokenizer}")
    if not any((tok / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")):
        raise ConfigError(
            f"model.tokenizer: no tokenizer files (tokenizer.json, vocab.txt, ...) in {tokenizer}"
        )
    if m.pad_vocab_multiple < 1:
        raise ConfigError("model.pad_vocab_multiple must be ≥ 1")
    if not 0 <= m.z_loss < 1:
        raise ConfigError(f"model.z_loss must be within [0, 1) (1e-4 is usual; 0: off), got {m.z_loss}")
    if m.loss_chunk_tokens < 0:
        raise ConfigError(f"model.loss_chunk_tokens must be ≥ 0 (0: full logits), got {m.loss_chunk_tokens}")
    if m.activation_checkpointing_layers < 0:
        raise ConfigError(
            f"model.activation_checkpointing_layers must be ≥ 0 (0: all blocks), got {m.activation_checkpointing_layers}"
        )
    if m.activation_checkpointing_layers and not m.activation_checkpointing:
        raise ConfigError(
            "model.activation_checkpointing_layers is set but model.activation_checkpointing is false: "
            "set model.activation_checkpointing=true"
        )


def _check_train(cfg: Config) -> None:
    t = cfg.train
    positive = {
        **({"train.max_steps": t.max_steps} if t.max_steps is not None else {}),
        "train.global_batch_size": t.global_batch_size,
        "train.micro_batch_size": t.micro_batch_size,
        "train.log_every": t.log_every,
        "train.keep_last": t.keep_last,
        "train.eval_steps": t.eval_steps,
        "data.prefetch_factor": cfg.data.prefetch_factor,
        "data.shuffle_window": cfg.data.shuffle_window,
        "train.max_nonfinite": t.max_nonfinite,
        "run.collective_timeout_s": cfg.run.collective_timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    for key, value in {
        "train.save_every": t.save_every,
        "train.export_hf_every": t.export_hf_every,
        "train.eval_every": t.eval_every,
        "train.gc_every": t.gc_every,
        "train.warmup_steps": t.warmup_steps,
        "train.keep_every": t.keep_every,
        "train.early_stopping_patience": t.early_stopping_patience,
        "data.num_workers": cfg.data.num_workers,
        "train.grad_clip": t.grad_clip,
        "train.weight_decay": t.weight_decay,
        "train.skip_spike_sigma": t.skip_spike_sigma,
    }.items():
        if value < 0:
            raise ConfigError(f"{key} must be ≥ 0, got {value}")
    if t.per_layer_norms_every and cfg.zero.offload_optimizer == "nvme":
        # ZeRO-3 swaps a whole sub-group in from NVMe to read one parameter's piece: per parameter,
        # twice a measurement
        raise ConfigError(
            "train.per_layer_norms_every cannot read optimizer states offloaded to NVMe; set it to 0"
        )
    if t.per_layer_norms_every < 0 or t.per_layer_norms_every % t.log_every:
        raise ConfigError(
            f"train.per_layer_norms_every={t.per_layer_norms_every} must be 0 or a multiple of train.log_every={t.log_every}: "
            "the norms are written with a log line"
        )
    if t.skip_spike_window < 4:  # half of it, at least 2 steps, must be seen before judging
        raise ConfigError(f"train.skip_spike_window must be ≥ 4, got {t.skip_spike_window}")
    if not t.lr > 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    for key, value in {"train.adam_beta1": t.adam_beta1, "train.adam_beta2": t.adam_beta2}.items():
        if not 0 <= value < 1:  # torch's AdamW checks this only when the engine is built
            raise ConfigError(f"{key} must be within [0, 1), got {value}")
    if not t.adam_eps >= 0:
        raise ConfigError(f"train.adam_eps must be ≥ 0, got {t.adam_eps}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio must be within [0, 1], got {t.min_lr_ratio}")
    if not 0 < cfg.data.mlm_probability < 1:
        raise ConfigError(f"data.mlm_probability must be within (0, 1), got {cfg.data.mlm_probability}")
    check_ramp(t.batch_ramp, t.global_batch_size, t.micro_batch_size)
    if t.batch_ramp and cfg.zero.ds_config_overrides.get("managed_gradient_accumulation") is False:
        raise ConfigError(
            "train.batch_ramp needs DeepSpeed's managed gradient accumulation: the trainer marks each ramp "
            "step's last micro-batch (remove managed_gradient_accumulation from zero.ds_config_overrides)"
        )
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{t.micro_batch_size} (global = micro × grad accumulation × data-parallel size)"
        )
    if t.straggler_ratio and not t.straggler_ratio > 1:
        raise ConfigError(f"train.straggler_ratio must be > 1 (or 0: no warning), got {t.straggler_ratio}")
    if t.keep_every and (not t.save_every or t.keep_every % t.save_every):
        raise ConfigError(
            f"train.keep_every={t.keep_every} keeps checkpoints at its multiples: make it a multiple of "
            f"train.save_every ({t.save_every}) so there are some"
        )
    if t.decay_steps is not None:
        if not t.schedule.startswith("wsd"):
            raise ConfigError(
                f"train.decay_steps only applies to train.schedule wsd or wsd_sqrt (not {t.schedule})"
            )
        if t.decay_steps < 1:
            raise ConfigError(f"train.decay_steps must be ≥ 1, got {t.decay_steps}")
    if t.grad_dtype == "fp32" and t.precision == "fp16":
        raise ConfigError("train.grad_dtype=fp32 applies to bf16 runs (fp16 keeps its loss-scaled gradients)")
    if t.export_hf and not t.save_final:  # it exports the final checkpoint (an older one, or none)
        raise ConfigError(
            "train.export_hf converts the final checkpoint, which train.save_final=false does not "
            "write: set one of them the other way"
        )
    if t.peak_flops is not None and t.peak_flops <= 0:
        raise ConfigError("train.peak_flops must be > 0 (FLOP/s of one device)")


def _check_zero(cfg: Config) -> None:
    z = cfg.zero
    check_ds_config_overrides(z.ds_config_overrides)
    if z.offload_param != "none" and z.stage != 3:
        raise ConfigError(f"zero.offload_param={z.offload_param} needs zero.stage=3 (got stage {z.stage})")
    if z.offload_optimizer != "none" and z.stage == 0:
        raise ConfigError(f"zero.offload_optimizer={z.offload_optimizer} needs zero.stage ≥ 1")
    if cfg.model.compile and z.stage == 3:
        # measured on a 4-block Llama: ~30 graphs, and torch's recompile limit hit inside
        # DeepSpeed's own hook functions, for blocks left in per-layer fragments with little to fuse
        raise ConfigError(
            "model.compile with zero.stage=3: DeepSpeed fetches each layer's parameters in hooks "
            "that split every compiled block into per-layer fragments, so there is little to fuse "
            "and dozens of graphs to compile; use model.compile with zero.stage ≤ 2, or leave it "
            "off under ZeRO-3"
        )
    if "nvme" in (z.offload_param, z.offload_optimizer):
        if not z.nvme_path:
            raise ConfigError(
                "NVMe offload needs 'zero.nvme_path' (an existing directory on a fast local disk)"
            )
        if not Path(z.nvme_path).is_dir():
            raise ConfigError(f"zero.nvme_path: directory not found: {z.nvme_path}")
    for key in (
        "reduce_bucket_size",
        "allgather_bucket_size",
        "stage3_prefetch_bucket_size",
        "stage3_max_live_parameters",
    ):
        if getattr(z, key) <= 0:
            raise ConfigError(f"zero.{key} must be > 0")
    if cfg.train.nonfinite == "skip" and z.stage == 0 and cfg.train.precision in ("fp32", "auto"):
        raise ConfigError(
            "train.nonfinite=skip needs zero.stage ≥ 1 (or bf16/fp16): ZeRO's optimizers discard an "
            "update whose gradient norm is not finite, plain fp32 data parallel does not"
        )
    if cfg.train.grad_dtype == "fp32" and z.stage < 2 and cfg.train.precision != "fp32":
        # stage 0 has none; stage 1 would swap in DeepSpeed's BF16_Optimizer, another checkpoint
        # layout that ds_train's resume and conversion are not tested with
        raise ConfigError(
            f"train.grad_dtype=fp32 needs zero.stage 2 or 3 (got {z.stage}): DeepSpeed accumulates "
            "bf16 gradients in fp32 only in its ZeRO-2/3 optimizers"
        )
    if z.offload_optimizer == "nvme" and z.stage != 3:
        raise ConfigError("zero.offload_optimizer=nvme is only supported with zero.stage=3")
    offload = (z.ds_config_overrides.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if cfg.train.skip_spike_sigma and (offload.get("super_offload") or offload.get("ratio", 1) < 1):
        # both step part of the model through an optimizer of their own (ZeRO-3's backup_optimizer
        # for the sub-groups kept on the GPU, SuperOffload's CPU step), which the spike gate does not see
        raise ConfigError(
            "train.skip_spike_sigma cannot gate DeepSpeed's partial optimizer offload "
            "(offload_optimizer.ratio < 1) or super_offload in zero.ds_config_overrides: a skipped step "
            "would still update part of the model"
        )


def _check_profile(cfg: Config) -> None:
    p = cfg.profile
    if p.start_step < 0:
        raise ConfigError(f"profile.start_step must be ≥ 0 (0: off), got {p.start_step}")
    if not p.start_step:
        return
    if p.steps < 1:
        raise ConfigError(f"profile.steps must be ≥ 1, got {p.steps}")
    if p.warmup_steps < 0:
        raise ConfigError(f"profile.warmup_steps must be ≥ 0, got {p.warmup_steps}")
    if p.start_step <= p.warmup_steps:
        raise ConfigError(
            f"profile.start_step={p.start_step} leaves no room for profile.warmup_steps={p.warmup_steps} "
            f"before it: set start_step ≥ {p.warmup_steps + 1}"
        )
    check_profile_window(cfg)
    ranks = p.ranks
    if not (
        ranks == "all"
        or (isinstance(ranks, list) and ranks and all(type(r) is int and r >= 0 for r in ranks))
    ):
        raise ConfigError(
            f"profile.ranks must be 'all' or a list of rank numbers (e.g. [0, 3]), got {ranks!r}"
        )


def check_profile_window(cfg: Config) -> None:
    """The profile window ends before train.max_steps (unknown until train.epochs is resolved)."""
    p = cfg.profile
    if not p.start_step or cfg.train.max_steps is None:
        return
    last = p.start_step + p.steps - 1
    if last >= cfg.train.max_steps:
        raise ConfigError(
            f"profile window steps {p.start_step}-{last} must end before train.max_steps={cfg.train.max_steps} "
            "(the last step's ProfilerStep annotation would hold the final evaluation and checkpoint)"
        )
