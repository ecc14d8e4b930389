"""What DeepSpeed leaves out when it resumes an optimizer offloaded to NVMe, put back.

With `offload_optimizer: nvme`, DeepSpeed's `load_checkpoint` skips the ZeRO optimizer files
altogether (deepspeed/runtime/engine.py: `if load_zero_checkpoint and not
self.zero_nvme_offload_optimizer()`, 0.19.8) and only copies back the swap files it saved under
`<tag>/offloaded_tensors/`. What that leaves out is lost, silently (0.19.8, found by
tests/distributed/test_offload.py; a bare DeepSpeed loop shows the same):

- Adam's step count of every sub-group: the bias correction restarts at step 1;
- each group's hyperparameters as the last step left them: the learning rate the LR schedule set
  for the next update reverts to the schedule's first;
- the moments of swapped sub-groups: their files come back, but the fresh optimizer has no state
  entries for the swapper to read them into (Adam creates its moments at its first step), so Adam
  starts again from zeros;
- whole sub-groups under the swap threshold (1 MiB of fp32 per rank and sub-group: the norms'
  group, every group of a small model), which live in memory: master weights and moments stay the
  fresh engine's, and ZeRO-3 rebuilds the working weights from those masters (a small model's loss
  went back to the untrained model's, 8.32 instead of 7.95).

The rank's optimizer file holds what is missing (empty tensors stand in for the swapped ones), so
after DeepSpeed's load this restores it from there: in place, since the swapper keeps references
to the state tensors. Each step checks DeepSpeed's layout, so a release that changes it fails
loudly here instead of resuming wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def offloads_optimizer_to_nvme(engine: Any) -> bool:
    return bool(getattr(engine.optimizer, "swap_optimizer", False))


def restore_skipped_optimizer_state(engine: Any, root: Path, tag: str) -> int:
    """After `engine.load_checkpoint(root, tag)` with the optimizer on NVMe (same world size):
    load this rank's optimizer file and restore what DeepSpeed skipped. Returns how many
    sub-groups were held in memory and restored whole. Call inside `safe_loading(engine)`."""
    opt = engine.optimizer
    saved = engine.checkpoint_engine.load(engine._get_zero_ckpt_name(str(root), tag), map_location="cpu")
    saved = saved["optimizer_state_dict"]
    saved_flat, saved_inner = saved["fp32_flat_groups"], saved["optimizer_state_dict"]
    current = opt.fp32_partitioned_groups_flat
    if len(saved_flat) != len(current):
        raise RuntimeError(
            f"checkpoint has {len(saved_flat)} optimizer sub-groups, the engine {len(current)}"
        )

    # fp16's dynamic loss scale and its counters, and the last step's overflow flag
    opt.loss_scaler, opt.dynamic_loss_scale, opt.overflow = (
        saved["loss_scaler"],
        saved["dynamic_loss_scale"],
        saved["overflow"],
    )
    inner = opt.optimizer  # DeepSpeedCPUAdam: its state is keyed by the sub-groups' fp32 tensors
    opt._set_fp32_optimizer_param_groups()
    try:
        # torch's optimizer state_dict numbers parameters group by group, as param_groups lists them
        params = [p for group in inner.param_groups for p in group["params"]]
        ids = [i for group in saved_inner["param_groups"] for i in group["params"]]
    finally:
        opt._clear_fp32_optimizer_param_groups()
    if len(params) != len(current) or len(ids) != len(params):
        raise RuntimeError("the optimizer's parameter groups do not match the checkpoint's")
    # the groups' hyperparameters as the last step left them (the learning rate the LR schedule set
    # for the next update, among them), as torch's Optimizer.load_state_dict restores them
    for group, saved_group in zip(inner.param_groups, saved_inner["param_groups"], strict=True):
        group.update({k: v for k, v in saved_group.items() if k != "params"})

    restored = 0
    for sub_group, (fp32, saved_fp32) in enumerate(zip(current, saved_flat, strict=True)):
        position = next(k for k, p in enumerate(params) if p is fp32)
        # no saved state: saved before Adam's first step (a preemption at step 0, or fp16 steps all
        # skipped on overflow); the master weights are restored, the moments do not exist yet
        saved_state = saved_inner["state"].get(ids[position], {})
        state = inner.state[fp32]
        if "step" in saved_state:
            state["step"] = saved_state["step"]
        if opt._swappable_optimizer_subgroup(sub_group):
            _register_swapped_moments(opt, sub_group, fp32, state, saved_state)
            continue
        if saved_fp32.numel() != fp32.numel():
            raise RuntimeError(
                f"optimizer sub-group {sub_group}: {saved_fp32.numel()} saved elements, {fp32.numel()} now"
            )
        with torch.no_grad():
            fp32.copy_(saved_fp32)
            for key, value in saved_state.items():
                if torch.is_tensor(value) and key in state:
                    state[key].copy_(value)
                elif torch.is_tensor(value):
                    state[key] = value.clone()
        opt._reassign_or_swap_out_partitioned_parameters(sub_group)  # working weights from the masters
        restored += 1
    if restored and opt.persistent_parameters:
        # parameters kept whole on every rank (under stage3_param_persistence_threshold): re-gather
        # them from the restored partitions, as DeepSpeed's own optimizer load does
        opt.persistent_parameters[0].partition(opt.persistent_parameters)
        opt.checkpoint_event_epilogue()
    return restored


def _register_swapped_moments(
    opt: Any, sub_group: int, fp32: torch.Tensor, state: dict, saved_state: dict
) -> None:
    """A swapped sub-group's moments are in the swap files DeepSpeed copied back, named
    `<state>-<id>.tensor.swp`, but the fresh optimizer has no state entries for the swapper to read
    them into (Adam creates its moments at its first step, and the swapper only learns of state
    tensors it finds then). Register entries of the right size under the saved names, then let
    their memory go: the next swap-in fills them from the files."""
    numel = int(opt.fp16_partitioned_groups_flat_numel[sub_group])
    names = [key for key, value in saved_state.items() if torch.is_tensor(value) and key not in state]
    for key in names:
        state[key] = torch.empty(numel, dtype=fp32.dtype)
    if names:
        opt.optimizer_swapper._get_param_swap_info(fp32)  # records them as this parameter's state tensors
        for key in names:
            state[key].data = torch.empty(0, dtype=fp32.dtype)  # as the swapper leaves a swapped-out tensor


# --- what a checkpoint records so it can be converted and its resume checked ----------------------

LAYOUT_KEY = "nvme_optimizer_sub_groups"  # in ds_train_state.json


def swap_layout(engine: Any) -> dict:
    """For the checkpoint state: each ZeRO-3 optimizer sub-group's fp32 elements per rank and, if
    swapped, its master-weight file under `offloaded_tensors/rankNN/` (the optimizer file then holds
    an empty tensor in its place). Every rank's sub-groups have the same sizes and names. Empty
    without NVMe optimizer offload."""
    if not offloads_optimizer_to_nvme(engine):
        return {}
    opt = engine.optimizer
    groups = []
    for sub_group, fp32 in enumerate(opt.fp32_partitioned_groups_flat):
        swapped = opt._swappable_optimizer_subgroup(sub_group)
        groups.append(
            {
                "numel": int(opt.fp16_partitioned_groups_flat_numel[sub_group]),
                # DeepSpeed names the file after the flat tensor's ds_id (swap_tensor/optimizer_utils.py)
                "swap_file": f"{fp32.ds_id}.tensor.swp" if swapped else None,
            }
        )
    return {LAYOUT_KEY: groups}


def elastic_resume_problem(state: dict, world_size: int, offload_optimizer: str) -> str | None:
    """Resuming on another world size goes through DeepSpeed's universal format, which reads the
    optimizer files: a checkpoint whose optimizer was swapped to NVMe holds its swapped parts
    elsewhere, and DeepSpeed does not load universal checkpoints into an NVMe-offloaded optimizer."""
    saved_world = state.get("world_size")
    if state.get("universal") and offload_optimizer == "nvme":  # `convert reshard`'s, any world size
        return (
            "this checkpoint is in DeepSpeed's universal format (from `ds-train convert reshard` or an elastic "
            "resume), which DeepSpeed does not load into an optimizer offloaded to NVMe: resume it with "
            "zero.offload_optimizer=cpu, or from the checkpoint it was made from"
        )
    if saved_world in (None, world_size):
        return None
    if LAYOUT_KEY in state or offload_optimizer == "nvme":
        return (
            f"the checkpoint was saved by {saved_world} ranks and this run has {world_size}; resuming on "
            "another world size is not possible with zero.offload_optimizer=nvme (on either side): DeepSpeed "
            "neither converts swapped optimizer state nor loads a universal checkpoint into an NVMe-offloaded "
            f"optimizer. Resume on {saved_world} ranks, or export the weights (`ds-train convert to-hf`) and "
            "start from them with model.init_from"
        )
    return None
