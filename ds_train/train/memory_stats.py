"""Memory figures for each log interval of metrics.jsonl (reduced to the max over ranks).

On a GPU: the interval's peak allocated and reserved bytes (the peaks are reset after each read,
so a later interval is not hidden behind start-up) and the caching allocator's cudaMalloc retries
so far: a retry means the allocator had to free its cache and try again, which stalls the step and
is the usual sign of fragmentation near the memory limit (torchtitan logs the same). On every
device: the process's peak resident host memory, what ZeRO-Offload and the loader spend.
"""

from __future__ import annotations

import resource

import torch

GIB = 2**30


def device_memory(device: torch.device) -> dict[str, float]:
    """This interval's CUDA peaks and the retries so far, resetting the peaks; {} off CUDA."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    torch.cuda.reset_peak_memory_stats(device)
    return {
        "peak_allocated_gib": stats.get("allocated_bytes.all.peak", 0) / GIB,
        "peak_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / GIB,
        "alloc_retries": float(stats.get("num_alloc_retries", 0)),
    }


def host_peak_rss_gib() -> float:
    """Peak resident memory of this process's own image since it started.

    Linux's VmHWM, not getrusage's ru_maxrss: ru_maxrss carries the peak of the image a process
    was forked from across exec, so a rank spawned by a big parent (a launcher, pytest) would start
    at the parent's size. ru_maxrss (KiB on Linux) only where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GIB  # "VmHWM:   123456 kB"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
