"""Where a profiled step's time went, read back from the Chrome-trace JSON torch.profiler writes.

The trace itself is for Perfetto (ui.perfetto.dev) or chrome://tracing; this reduces it to the
figures a performance engineer reads first when MFU falls short, after Holistic Trace Analysis'
temporal and kernel breakdowns (HTA is a heavy dependency for these few numbers, and needs the
trace files of all ranks in one place):

- wall time of each recorded step (torch.profiler's `ProfilerStep#N` annotations on the host);
- on a GPU, the share of the recorded window in which any kernel ran ("busy": the rest is the GPU
  waiting for the CPU, the loader or a host sync), kernel time by kind (matmul, attention,
  communication, memory copies, optimizer, torch.compile's fused kernels, other), the heaviest
  kernels, and the communication no
  compute kernel overlapped ("exposed": what overlap_comm and bucket sizes can still win).

Kernels count by when they ran, inside the wall-clock span of the recorded steps: the GPU runs
behind the host, so a step's trailing kernels (optimizer, ZeRO's gathers) may run in the next
step's span and the previous step's in this one; in steady state the two even out.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

# First match wins: NCCL kernels are named after their collective, flash/cuDNN attention kernels
# often contain "cutlass" or "gemm" too, so communication and attention are tried before matmul.
KERNEL_KINDS: tuple[tuple[str, re.Pattern], ...] = (
    ("communication", re.compile(r"nccl|all_?reduce|all_?gather|reduce_?scatter", re.I)),
    ("memory", re.compile(r"^mem(cpy|set)", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|attn|sdpa", re.I)),
    # cuBLAS(Lt) names its Hopper GEMMs sm90_xmma_gemm_* or, from CUDA 12.8, nvjet_*; torch.compile's
    # Triton matmul templates are triton_tem_fused_*mm*
    (
        "matmul",
        re.compile(r"gemm|xmma|nvjet|cutlass|cublas|matmul|wgmma|splitk|triton_tem_fused_\w*mm", re.I),
    ),
    # multi-tensor kernels: the Adam update, but also the gradient norm and zeroing around it
    ("optimizer", re.compile(r"multi_tensor|adam", re.I)),
    # torch.compile's (model.compile) Triton pointwise / reduction / persistent-reduction kernels:
    # the norms, activations and residual adds it fused, apart from eager's elementwise "other"
    ("fused", re.compile(r"^triton_(poi|red|per)_", re.I)),
)
DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
_STEP = re.compile(r"^ProfilerStep#(\d+)$")


def kernel_kind(name: str, category: str = "kernel") -> str:
    """The kind a device event counts under in the breakdown."""
    if category in ("gpu_memcpy", "gpu_memset"):
        return "memory"
    for kind, pattern in KERNEL_KINDS:
        if pattern.search(name):
            return kind
    return "other"


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def load_trace(path: Path) -> list[dict]:
    """The `traceEvents` of a Chrome-trace file, gzipped (`.gz`) or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def summarize_trace(events: list[dict], *, last_step: int | None = None, top: int = 10) -> dict:
    """The breakdown of the recorded steps up to `last_step`; `device` is None without GPU events."""
    steps = sorted(
        (int(m.group(1)), e["ts"], e["ts"] + e["dur"])
        for e in events
        # the host's annotation: on a GPU, kineto repeats it per stream as gpu_user_annotation
        if e.get("ph") == "X"
        and e.get("cat") == "user_annotation"
        and (m := _STEP.match(str(e.get("name", ""))))
    )
    steps = [s for s in steps if last_step is None or s[0] <= last_step]
    if not steps:
        return {"steps": [], "step_ms": [], "window_ms": 0.0, "device": None}
    lo, hi = steps[0][1], steps[-1][2]
    summary = {
        "steps": [n for n, _, _ in steps],
        "step_ms": [(end - start) / 1e3 for _, start, end in steps],  # trace times are in µs
        "window_ms": (hi - lo) / 1e3,
        "device": None,
    }
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in DEVICE_CATEGORIES:
            continue
        start, end = max(e["ts"], lo), min(e["ts"] + e["dur"], hi)  # inside the recorded steps
        if end <= start:
            continue
        spans[kernel_kind(e["name"], e["cat"])].append((start, end))
        by_name[e["name"]][0] += end - start
        by_name[e["name"]][1] += 1
    if not spans:
        return summary
    window = hi - lo
    busy = union_length(s for kind_spans in spans.values() for s in kind_spans)
    kernel_total = sum(end - start for kind_spans in spans.values() for start, end in kind_spans)
    compute = [
        s for kind, kind_spans in spans.items() if kind not in ("communication", "memory") for s in kind_spans
    ]
    comm = spans.get("communication", [])
    comm_alone = union_length(comm)
    overlapped = comm_alone + union_length(compute) - union_length(comm + compute)
    heaviest = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    summary["device"] = {
        "busy_frac": busy / window,
        "kernel_ms": kernel_total / 1e3,
        "by_kind": {
            kind: sum(e - s for s, e in kind_spans) / kernel_total for kind, kind_spans in spans.items()
        },
        "comm_exposed_frac": (comm_alone - overlapped) / window,
        "top_kernels": [{"name": name[:160], "ms": t / 1e3, "calls": int(n)} for name, (t, n) in heaviest],
    }
    return summary


def describe(summary: dict) -> str:
    """One line: the steps, their mean wall time and, on a GPU, busy share and kernel kinds."""
    if not summary["steps"]:
        return "no complete step was recorded"
    steps = summary["steps"]
    span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
    line = f"{span}: {sum(summary['step_ms']) / len(steps):,.1f} ms/step"
    device = summary["device"]
    if device:
        kinds = sorted(device["by_kind"].items(), key=lambda kv: -kv[1])
        line += f"; GPU busy {device['busy_frac']:.0%} of the window; kernel time: " + ", ".join(
            f"{kind} {frac:.0%}" for kind, frac in kinds
        )
        if "communication" in device["by_kind"]:
            line += f"; exposed communication {device['comm_exposed_frac']:.1%} of the window"
    return line


def profile_lines(run_dir: str | Path) -> list[str]:
    """One line per profile a run directory holds, by window then rank (for `ds-train report`)."""
    found = []
    for path in Path(run_dir).glob("profile/steps_*/rank*.summary.json"):
        first_step = int(path.parent.name.removeprefix("steps_").split("-")[0])
        rank = int(path.name.removeprefix("rank").split(".")[0])
        found.append((first_step, rank, path))
    return [
        f"profile (rank {rank}): {describe(json.loads(path.read_text()))} [{path.parent}]"
        for _, rank, path in sorted(found)
    ]
