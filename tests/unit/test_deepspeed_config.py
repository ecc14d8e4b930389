"""The one DeepSpeed JSON builder: batch arithmetic, ZeRO options, optimizer choice, overrides."""

from __future__ import annotations

from ds_train.config import from_dict
from ds_train.distributed.deepspeed_config import build_deepspeed_config


def _cfg(**zero):
    return from_dict(
        {
            "run": {"output_dir": "/tmp/x"},
            "train": {"max_steps": 1, "global_batch_size": 32, "micro_batch_size": 4, "precision": "fp32"},
            "zero": zero,
        }
    )


def test_parameter_swap_buffers_hold_one_partition_of_the_largest_parameter(tmp_path):
    """DeepSpeed's default (5 buffers of 1e8 elements) is set aside whatever the model, and too small
    for a big embedding's partition on few ranks; ds-train sizes the buffers from the model."""
    from transformers import AutoConfig

    from ds_train.distributed.deepspeed_config import largest_param_to_swap
    from tests.helpers import REPO

    (tmp_path / "nvme").mkdir()
    nvme = _cfg(stage=3, offload_param="nvme", nvme_path=str(tmp_path / "nvme"))
    hf = AutoConfig.from_pretrained(REPO / "configs" / "model" / "tiny-llama.json")
    largest = largest_param_to_swap(nvme, hf)
    assert largest == hf.vocab_size * hf.hidden_size  # the embedding (and the untied head)
    z = build_deepspeed_config(nvme, 4, largest)["zero_optimization"]
    assert z["offload_param"]["buffer_size"] == -(-largest // 4)
    # no NVMe parameter offload, or no model given: DeepSpeed's own defaults, untouched
    assert largest_param_to_swap(_cfg(stage=3, offload_param="cpu"), hf) is None
    assert "buffer_size" not in build_deepspeed_config(nvme, 4)["zero_optimization"]["offload_param"]


def test_batch_is_derived_once():
    ds = build_deepspeed_config(_cfg(stage=2), data_parallel_size=4)
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (32, 4, 2)
    ds1 = build_deepspeed_config(_cfg(stage=2), data_parallel_size=1)
    assert ds1["gradient_accumulation_steps"] == 8


def test_stage3_and_offload_options():
    ds = build_deepspeed_config(_cfg(stage=3, offload_optimizer="cpu", offload_param="cpu"), 2)
    z = ds["zero_optimization"]
    assert (
        z["stage"] == 3
        and z["offload_param"]["device"] == "cpu"
        and z["offload_optimizer"]["device"] == "cpu"
    )
    assert "torch_adam" not in ds["optimizer"]["params"]  # offload needs DeepSpeed's CPU Adam
    ds = build_deepspeed_config(_cfg(stage=1), 2)
    assert (
        ds["optimizer"]["params"]["torch_adam"] is True
        and "stage3_prefetch_bucket_size" not in ds["zero_optimization"]
    )


def test_precision_sections():
    cfg = _cfg(stage=2)
    cfg.train.precision = "bf16"
    assert build_deepspeed_config(cfg, 1)["bf16"] == {"enabled": True}
    cfg.train.precision = "fp32"
    ds = build_deepspeed_config(cfg, 1)
    assert "bf16" not in ds and "fp16" not in ds


def test_overrides_are_merged_last():
    ds = build_deepspeed_config(
        _cfg(
            stage=2,
            ds_config_overrides={
                "zero_optimization": {"round_robin_gradients": True},
                "wall_clock_breakdown": True,
            },
        ),
        2,
    )
    assert ds["zero_optimization"]["round_robin_gradients"] is True and ds["zero_optimization"]["stage"] == 2
    assert ds["wall_clock_breakdown"] is True


def test_deepspeeds_throughput_timer_and_its_device_syncs_are_off():
    from deepspeed.utils.config import get_timers_config

    ds = build_deepspeed_config(_cfg(stage=2), 2)
    assert get_timers_config(ds).enabled is False  # as DeepSpeed reads it
    assert get_timers_config({}).synchronized is True  # DeepSpeed's default, which this avoids


def test_fp32_gradients_of_a_bf16_run_are_accumulated_and_reduced_in_fp32():
    cfg = _cfg(stage=2)
    cfg.train.precision, cfg.train.grad_dtype = "bf16", "fp32"
    ds = build_deepspeed_config(cfg, data_parallel_size=2)
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    cfg.train.grad_dtype = "model"  # DeepSpeed's default: bf16
    assert not {"data_types", "communication_data_type"} & set(build_deepspeed_config(cfg, 2))
