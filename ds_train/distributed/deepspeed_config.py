"""The one place the DeepSpeed JSON is built, and the batch arithmetic behind it.

`global_batch_size = micro_batch_size × gradient_accumulation × data_parallel_size`: the user
gives the first two, the launcher gives the last, and accumulation is derived here and nowhere
else. With a batch-size ramp (`train.batch_ramp`, data/batch_schedule.py) the early steps
accumulate fewer micro-batches; DeepSpeed is configured for the final, largest batch and told each
step's last micro-batch by the trainer. Everything DeepSpeed needs (batch, precision, optimizer,
ZeRO stage and offload) comes from the run config through `build_deepspeed_config`; `zero.ds_config_overrides` is merged last.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch

from ds_train.config.loader import ConfigError, deep_merge
from ds_train.config.schema import Config, TrainSection
from ds_train.data.batch_schedule import BatchSchedule


@dataclass(frozen=True)
class BatchLayout:
    """The batch of the steps after any ramp (`global_batch_size`, `grad_accum`) and the ramp's
    stages before them (`ramp`: (last step as logged, global batch) pairs); `at(step)` gives one
    step's layout."""

    global_batch_size: int
    micro_batch_size: int
    grad_accum: int
    data_parallel_size: int
    ramp: tuple[tuple[int, int], ...] = ()

    @property
    def per_rank(self) -> int:
        """Sequences one rank consumes per optimizer step (after the ramp)."""
        return self.micro_batch_size * self.grad_accum

    @property
    def schedule(self) -> BatchSchedule:
        return BatchSchedule(self.global_batch_size, self.ramp)

    @property
    def steady(self) -> BatchLayout:
        """This layout without its ramp: the steps after it, and evaluation."""
        return replace(self, ramp=())

    def at(self, step: int) -> BatchLayout:
        """The layout of step `step` (counted from 0), without a ramp."""
        if not self.ramp:
            return self
        g = self.schedule.size(step)
        return BatchLayout(g, self.micro_batch_size, g // (self.micro_batch_size * self.data_parallel_size),
                           self.data_parallel_size)  # fmt: skip

    def micro_batch_at(self, start_step: int, k: int) -> tuple[int, int]:
        """(step, micro-batch within it) of the k-th micro-batch a rank consumes from `start_step` on."""
        step = start_step
        while True:
            accum = self.at(step).grad_accum
            end = next((until for until, _ in self.ramp if until > step), None)  # this stage's end
            if end is None or k < (end - step) * accum:
                return step + k // accum, k % accum
            k, step = k - (end - step) * accum, end


def batch_layout(train: TrainSection, data_parallel_size: int) -> BatchLayout:
    g, m, w = train.global_batch_size, train.micro_batch_size, data_parallel_size
    schedule = BatchSchedule.of(g, train.batch_ramp)
    for until, size in ((None, g), *schedule.ramp):
        if size % (m * w):
            key = "train.global_batch_size" if until is None else f"train.batch_ramp's batch to step {until}"
            raise ConfigError(
                f"{key}={size} must equal micro_batch_size × grad accumulation × data-parallel size, "
                f"but {size} / ({m} × {w}) = {size / (m * w):g} is not a whole number of accumulation steps; "
                f"use a global batch that is a multiple of {m * w}"
            )
    return BatchLayout(g, m, g // (m * w), w, schedule.ramp)


def resolve_precision(precision: str) -> str:
    """`auto` → bf16 on a GPU that supports it, else fp32 (CPU training in bf16 is slow and lossy)."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def build_deepspeed_config(cfg: Config, data_parallel_size: int, largest_param: int | None = None) -> dict:
    """The complete DeepSpeed config for this run on `data_parallel_size` ranks. `largest_param`
    (elements of the model's biggest parameter) sizes the swap buffers of parameter NVMe offload."""
    layout = batch_layout(cfg.train, data_parallel_size)
    precision = resolve_precision(cfg.train.precision)
    on_gpu = torch.cuda.is_available()
    z = cfg.zero

    zero: dict = {
        "stage": z.stage,
        "contiguous_gradients": z.contiguous_gradients,
        "reduce_bucket_size": z.reduce_bucket_size,
    }
    if z.overlap_comm is not None:
        zero["overlap_comm"] = z.overlap_comm
    if z.stage in (1, 2):
        zero["allgather_bucket_size"] = z.allgather_bucket_size
    if z.stage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": z.stage3_prefetch_bucket_size,
                "stage3_param_persistence_threshold": z.stage3_param_persistence_threshold,
                "stage3_max_live_parameters": z.stage3_max_live_parameters,
                # Full weights are exported from the checkpoint by `ds-train convert`, not gathered at save.
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if z.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(z.offload_optimizer, z.nvme_path, on_gpu)
    if z.offload_param != "none":
        zero["offload_param"] = _offload(z.offload_param, z.nvme_path, on_gpu)
        if z.offload_param == "nvme" and largest_param:
            zero["offload_param"].update(_param_swap_buffers(largest_param, data_parallel_size))

    optimizer_params: dict = {
        "lr": cfg.train.lr,
        "betas": [cfg.train.adam_beta1, cfg.train.adam_beta2],
        "eps": cfg.train.adam_eps,
        "weight_decay": cfg.train.weight_decay,
    }
    if z.offload_optimizer == "none":
        # torch's AdamW: no JIT-compiled op to build, and its fused CUDA kernel is as fast as FusedAdam.
        optimizer_params["torch_adam"] = True
        if on_gpu:
            optimizer_params["fused"] = True
    # With offload DeepSpeed requires its own CPU Adam (a C++ op compiled on first use).

    ds: dict = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": cfg.train.grad_clip,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # ds_train logs; DeepSpeed's own per-step prints stay off
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer (on by default) synchronises the device at every forward and
        # every engine.step(): twice per micro-batch the host stops running ahead of the GPU, which
        # then idles through each batch transfer and first kernel launches. It only feeds the
        # steps_per_print line switched off above; ds_train measures throughput itself.
        "timers": {"throughput": {"enabled": False}},
    }
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
        if cfg.train.grad_dtype == "fp32":  # accumulated over micro-batches and reduced in fp32
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
            ds["communication_data_type"] = "fp32"
    elif precision == "fp16":
        ds["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    if z.offload_param == "nvme" or z.offload_optimizer == "nvme":
        ds["aio"] = {
            "block_size": 1048576,
            "queue_depth": 8,
            "single_submit": False,
            "overlap_events": True,
            "thread_count": 1,
        }
    deep_merge(ds, copy.deepcopy(z.ds_config_overrides))
    return ds


def with_universal_loading(ds_config: dict) -> dict:
    """The same config, telling DeepSpeed to load a universal (world-size free) checkpoint."""
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def _offload(device: str, nvme_path: str | None, on_gpu: bool) -> dict:
    if device == "cpu":
        return {"device": "cpu", "pin_memory": on_gpu}
    return {"device": "nvme", "nvme_path": nvme_path, "pin_memory": on_gpu}


def _param_swap_buffers(largest_param: int, data_parallel_size: int) -> dict:
    """Parameter NVMe offload swaps each rank's partition of a parameter through one of
    `buffer_count` host buffers of `buffer_size` elements, allocated (pinned on a GPU) at start-up.
    DeepSpeed's default size, 1e8 elements, costs 5 × 1e8 elements of host memory per rank whatever
    the model (1.9 GiB in fp32 for a model of a few MB, docs/benchmarks.md "Offload"), and fails with
    "More elements ... than buffer size" once a partition is bigger (a 128k-vocabulary embedding of
    width 4096 on fewer than 6 ranks). One partition of the largest parameter is what a buffer must
    hold: sized so, the buffers cost what the model needs in both cases."""
    return {"buffer_size": math.ceil(largest_param / data_parallel_size)}


def largest_param_to_swap(cfg: Config, hf_config) -> int | None:
    """For `build_deepspeed_config`: the model's biggest parameter, where parameters go to NVMe."""
    if cfg.zero.offload_param != "nvme":
        return None
    from ds_train.plan.model_shape import shape_from_config

    return shape_from_config(hf_config, cfg.model.objective).largest_param
