"""The ZeRO stage / offload / activation-checkpointing choices, fastest first, and the pick.

Order (fastest first), and why:
  1. ZeRO-0, 1, 2: the same communication volume as data parallelism (stage 2's reduce-scatter +
     all-gather moves what one all-reduce moves), so only memory differs;
  2. ZeRO-3: 1.5× that volume, and every layer waits on a parameter all-gather that prefetching
     hides only partly;
  3. the same four with activation checkpointing: one more forward of each checkpointed block per
     step (≈ +33% compute when all are). Given a device memory, only as many blocks as it takes
     to fit (the first K, model.activation_checkpointing_layers) so the least is recomputed;
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
    estimates: list[Estimate]  # in CHOICES order (those the precision allows)
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
    usable = device_memory * (1 - headroom) if device_memory is not None else None

    def choice(stage: int, opt: str, par: str, checkpoint_layers: int) -> Estimate:
        return estimate(
            shape,
            stage=stage,
            world_size=world_size,
            precision=precision,
            micro_batch=micro_batch,
            seq_len=seq_len,
            checkpoint_layers=checkpoint_layers,
            offload_optimizer=opt,
            offload_param=par,
            buckets=buckets,
            attention=attention,
            loss=loss,
        )

    estimates = []
    for stage, opt, par, ckpt in CHOICES:
        if precision.fp32_grads and stage < 2:
            continue  # train.grad_dtype=fp32 is refused there (config/validate.py)
        e = choice(stage, opt, par, shape.layers if ckpt else 0)
        if ckpt and usable is not None and e.device <= usable:
            # the fewest blocks that fit: memory falls as K grows, so the first K that fits
            e = next(
                f for k in range(1, shape.layers + 1) if (f := choice(stage, opt, par, k)).device <= usable
            )
        estimates.append(e)
    recommended = next((e for e in estimates if usable is not None and e.device <= usable), None)
    return Plan(estimates, usable, recommended)


def checkpointing_label(e: Estimate, layers: int) -> str:
    if not e.checkpoint_layers:
        return "off"
    return "all" if e.checkpoint_layers == layers else f"{e.checkpoint_layers}/{layers}"


@dataclass(frozen=True)
class RunSettings:
    """What of the run config, besides the choice itself, its overrides must agree with."""

    compile: bool = False  # model.compile: refused at ZeRO-3 (config/validate.py)
    nvme_path: str | None = None  # zero.nvme_path: NVMe offload needs one


NVME_PATH_PLACEHOLDER = "/path/on/local/nvme"


def overrides_for(e: Estimate, layers: int, run: RunSettings = RunSettings()) -> str:
    """The run-config overrides that select this choice (`layers`: the model's block count).

    Every setting of the choice is named, "none" and "off" included: the run config (or its ZeRO
    preset) may set offload or partial checkpointing, and overrides that left those out printed a
    choice that failed validation (stage 0 under an offload preset). Likewise a ZeRO-3 choice for a
    config with model.compile turns compile off, and an NVMe choice without zero.nvme_path names
    the setting (with a placeholder to replace)."""
    checkpoint_layers = 0 if e.checkpoint_layers in (0, layers) else e.checkpoint_layers
    parts = [
        f"zero.stage={e.stage}",
        f"zero.offload_optimizer={e.offload_optimizer}",
        f"zero.offload_param={e.offload_param}",
        f"model.activation_checkpointing={str(bool(e.checkpoint_layers)).lower()}",
        f"model.activation_checkpointing_layers={checkpoint_layers}",
    ]
    if run.compile and e.stage == 3:
        parts.append("model.compile=false")
    if "nvme" in (e.offload_optimizer, e.offload_param) and not run.nvme_path:
        parts.append(f"zero.nvme_path={NVME_PATH_PLACEHOLDER}")
    return " ".join(parts)


def render(plan: Plan, header: list[str], layers: int, run: RunSettings = RunSettings()) -> str:
    """The table `ds-train plan` prints (GiB per rank; `layers`: the model's block count)."""

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
            f"{e.label:<30} {checkpointing_label(e, layers):>8} {gib(e.states.params)} "
            f"{gib(e.states.grads)} {gib(e.states.optimizer)} {gib(e.buffers)} {gib(e.activations)} "
            f"{gib(e.device)} {gib(e.host)}  {fits}{mark}"
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
            f"{checkpointing_label(plan.recommended, layers)}"
        )
        overrides = overrides_for(plan.recommended, layers, run)
        lines.append(f"  overrides: {overrides}")
        if "model.compile=false" in overrides:
            lines.append("  (model.compile is refused at ZeRO-3: this choice trains uncompiled)")
        if NVME_PATH_PLACEHOLDER in overrides:
            lines.append(f"  (replace {NVME_PATH_PLACEHOLDER} with a directory on a fast local NVMe drive)")
    return "\n".join(lines)
