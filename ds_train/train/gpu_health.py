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
    if device.type != "cuda":
        return [math.nan] * len(HEALTH_KEYS)
    # each on its own: a board may report its clock but not its power
    return [
        _read(torch.cuda.clock_rate, device),
        _read(torch.cuda.temperature, device),
        _read(torch.cuda.power_draw, device) / 1000,  # mW
    ]


def _read(nvml_query, device: torch.device) -> float:
    try:
        return float(nvml_query(device))
    except Exception:  # no nvidia-ml-py, NVML unavailable in this container, not supported: telemetry only
        return math.nan
