"""This rank's GPU as NVML reports it at a log step: SM clock, temperature, power draw.

A straggler's usual cause is a GPU running below its clocks: thermal or power throttling, a
failing board. So the log step gathers these beside each rank's forward time
(ds_train/train/stragglers.py), and the warning about a slow rank shows its clock against the
others'. Read through torch.cuda's NVML wrappers (nvidia-ml-py), which map CUDA_VISIBLE_DEVICES
to NVML's numbering. NaN where unknown (CPU, no NVML), so every rank gathers the same shape.
"""

from __future__ import annotations

import math

import torch

HEALTH_KEYS = ("sm_clock_mhz", "temperature_c", "power_w")


def gpu_health(device: torch.device) -> list[float]:
    """[SM clock MHz, temperature °C, power W] of `device`, NaN each where unknown."""
    unknown = [math.nan] * len(HEALTH_KEYS)
    if device.type != "cuda":
        return unknown
    try:
        return [
            float(torch.cuda.clock_rate(device)),
            float(torch.cuda.temperature(device)),
            torch.cuda.power_draw(device) / 1000,  # mW
        ]
    except Exception:  # no nvidia-ml-py, or NVML unavailable in this container: telemetry only
        return unknown
