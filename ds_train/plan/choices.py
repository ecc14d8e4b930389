"""The ZeRO stage / offload / activation-checkpointing choices, fastest first, and the pick.

Order (fastest first), and why:
  1. ZeRO-0, 1, 2: the same communication volume as data parallelism (stage 2's reduce-scatter +
     all-gather moves what one all-reduce moves), so only memory differs;
  2. ZeRO-3: 1.5× that volume, and every layer waits on a parameter all-gather that prefetching
     hides only partly;
  3. the same four with activation checkpointing: one more forward per step (≈ +33% compute);
  4. optimizer offload to CPU (stages 2, 3): the Adam step runs on the host at memory-bandwidth
     speed and gradients cross PCIe every step;
  5. parameter offload (stage 3), which also moves the weights across PCIe for every forward and
     backward; then NVMe, slower again.
A choice "fits" when its device estimate is within the device memory minus a headroom fraction
(allocator fragmentation, the CUDA context, kernels' workspaces).
"""

from __future__ import annotations

from dataclasses import dataclass

from ds_train.plan.memory_estimate import (
    FULL_LOGITS,
    BucketSizes,
    Estimate,
    GiB,
    HeadLoss,
    Precision,
    estimate,
)
from ds_train.plan.model_shape import ModelShape

# (stage, offload_optimizer, offload_param, activation checkpointing), fastest first.
CHOICES: list[tuple[int, str, str, bool]] = [
    *[(s, "none", "none", False) for s in (0, 1, 2, 3)],
    *[(s, "none", "none", True) for s in (0, 1, 2, 3)],
    (2, "cpu", "none", False),
    (3, "cpu", "none", False),
    (2, "cpu", "none", True),
    (3, "cpu", "none", True),
    (3, "cpu", "cpu", False),
    (3, "cpu", "cpu", True),
    (3, "nvme", "nvme", True),
]


@dataclass(frozen=True)
class Plan:
    estimates: list[Estimate]  # in CHOICES order
    usable_bytes: float | None  # device memory minus headroom; None: no device memory given
    recommended: Estimate | None

    def fits(self, e: Estimate) -> bool:
        return self.usable_bytes is not None and e.device <= self.usable_bytes


def make_plan(
    shape: ModelShape,
    *,
    world_size: int,
    precision: Precision,
    micro_batch: int,
    seq_len: int,
    buckets: BucketSizes,
    attention: str = "sdpa",
    loss: HeadLoss = FULL_LOGITS,
    device_memory: float | None = None,
    headroom: float = 0.1,
) -> Plan:
    estimates = [
        estimate(
            shape,
            stage=stage,
            world_size=world_size,
            precision=precision,
            micro_batch=micro_batch,
            seq_len=seq_len,
            checkpointing=ckpt,
            offload_optimizer=opt,
            offload_param=par,
            buckets=buckets,
            attention=attention,
            loss=loss,
        )
        for stage, opt, par, ckpt in CHOICES
    ]
    usable = device_memory * (1 - headroom) if device_memory is not None else None
    recommended = next((e for e in estimates if usable is not None and e.device <= usable), None)
    return Plan(estimates, usable, recommended)


def overrides_for(e: Estimate) -> str:
    """The run-config overrides that select this choice."""
    parts = [f"zero.stage={e.stage}"]
    if e.offload_optimizer != "none":
        parts.append(f"zero.offload_optimizer={e.offload_optimizer}")
    if e.offload_param != "none":
        parts.append(f"zero.offload_param={e.offload_param}")
    parts.append(f"model.activation_checkpointing={str(e.checkpointing).lower()}")
    return " ".join(parts)


def render(plan: Plan, header: list[str]) -> str:
    """The table `ds-train plan` prints (GiB per rank)."""

    def gib(x: float) -> str:
        return f"{x / GiB:8.2f}"

    lines = [*header, ""]
    lines.append(
        f"{'choice':<30} {'act.ckpt':>8} {'params':>8} {'grads':>8} {'optim':>8} {'buffers':>8} "
        f"{'activ.':>8} {'DEVICE':>8} {'host':>8}  fits"
    )
    for e in plan.estimates:
        fits = "" if plan.usable_bytes is None else ("yes" if plan.fits(e) else "no")
        mark = " <- recommended" if e is plan.recommended else ""
        lines.append(
            f"{e.label:<30} {'on' if e.checkpointing else 'off':>8} {gib(e.states.params)} "
            f"{gib(e.states.grads)} {gib(e.states.optimizer)} {gib(e.buffers)} {gib(e.activations)} "
            f"{gib(e.device)} {gib(e.states.host)}  {fits}{mark}"
        )
    lines.append("")
    if plan.usable_bytes is None:
        lines.append("pass --device-memory (e.g. 80GB) for a recommendation")
    elif plan.recommended is None:
        lines.append(
            f"nothing fits in {plan.usable_bytes / GiB:.1f} GiB usable per device: lower "
            "train.micro_batch_size or the sequence length, or add ranks"
        )
    else:
        lines.append(
            f"recommended (fastest that fits in {plan.usable_bytes / GiB:.1f} GiB usable): "
            f"{plan.recommended.label}, activation checkpointing "
            f"{'on' if plan.recommended.checkpointing else 'off'}"
        )
        lines.append(f"  overrides: {overrides_for(plan.recommended)}")
    return "\n".join(lines)
