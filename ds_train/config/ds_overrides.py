"""Which keys of `zero.ds_config_overrides` are refused: those ds_train derives from its own config.

The overrides are merged last into the DeepSpeed JSON (distributed/deepspeed_config.py), so an
override of a derived key won silently: `zero_optimization.stage=1` made DeepSpeed run stage 1
while the banner and ds_train_state.json said 3, and `gradient_accumulation_steps` failed
DeepSpeed's batch assertion with a traceback after start-up. The same holds for the ZeRO tuning
keys that have a `zero.*` setting (bucket sizes, overlap_comm, the stage-3 thresholds): the
override won over the setting that `ds-train plan` and the run's banner read. Tuning keys
ds_train does not set (sub_group_size, round_robin_gradients, aio, loss-scale details, optimizer
flags such as `fused`) stay allowed: that is what the escape hatch is for.
"""

from __future__ import annotations

from typing import Any

from ds_train.config.loader import ConfigError

# zero_optimization keys that are also ds_train settings of the same name (config/schema.py)
ZERO_TUNING = (
    "overlap_comm",
    "contiguous_gradients",
    "reduce_bucket_size",
    "allgather_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_max_live_parameters",
)

# DeepSpeed key path → the ds_train setting(s) it comes from.
DERIVED: dict[tuple[str, ...], str] = {
    ("train_batch_size",): "train.global_batch_size",
    ("train_micro_batch_size_per_gpu",): "train.micro_batch_size",
    ("gradient_accumulation_steps",): (
        "train.global_batch_size and train.micro_batch_size (accumulation = global / (micro × ranks))"
    ),
    ("gradient_clipping",): "train.grad_clip",
    ("zero_optimization", "stage"): "zero.stage",
    ("zero_optimization", "offload_optimizer", "device"): "zero.offload_optimizer",
    ("zero_optimization", "offload_optimizer", "nvme_path"): "zero.nvme_path",
    ("zero_optimization", "offload_param", "device"): "zero.offload_param",
    ("zero_optimization", "offload_param", "nvme_path"): "zero.nvme_path",
    ("bf16", "enabled"): "train.precision",
    ("fp16", "enabled"): "train.precision",
    ("optimizer", "type"): "train.* (ds_train always trains with AdamW)",
    ("optimizer", "params", "lr"): "train.lr",
    ("optimizer", "params", "betas"): "train.adam_beta1 and train.adam_beta2",
    ("optimizer", "params", "eps"): "train.adam_eps",
    ("optimizer", "params", "weight_decay"): "train.weight_decay",
    # ds_train sets the learning rate itself at every step; a DeepSpeed scheduler would fight it
    ("scheduler",): "train.schedule, train.warmup_steps and train.min_lr_ratio",
    # tuning keys with a zero.* setting of their own (which `ds-train plan` and the bench read):
    # an override of one won over that setting, silently
    **{("zero_optimization", key): f"zero.{key}" for key in ZERO_TUNING},
    # DeepSpeed's own names for the stage-3 ones (pydantic aliases: either spelling is read)
    **{
        ("zero_optimization", key.removeprefix("stage3_")): f"zero.{key}"
        for key in ZERO_TUNING
        if "stage3_" in key
    },
}


def check_ds_config_overrides(overrides: Any) -> None:
    """Raise ConfigError (one line) for the first override of a key ds_train derives."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"zero.ds_config_overrides must be a mapping of DeepSpeed keys, got {overrides!r}")
    for path, setting in DERIVED.items():
        node: Any = overrides
        for depth, part in enumerate(path):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
            # reached the key, or a non-mapping that would replace the section holding it
            if depth == len(path) - 1 or not isinstance(node, dict):
                shown = ".".join(path[: depth + 1])
                raise ConfigError(
                    f"zero.ds_config_overrides.{shown}: ds_train sets this from {setting}; "
                    "set that instead (the overrides are for DeepSpeed keys ds_train does not set)"
                )
