"""`ds-train convert verify CKPT HF_DIR`: is this HF directory the checkpoint's model?

Two checks, as downstream teams need them: every tensor bitwise (the checkpoint's fp32 master
weights, rounded to the exported dtype), and the logits of a fixed batch (max abs diff ≤ 1e-5 in
fp32) between the model stock transformers loads from HF_DIR and the same architecture holding
the checkpoint's weights — a logit check catches what a tensor-by-tensor round trip cannot
(a wrong architecture, rotary or tie setting). The reference weights are consolidated here by a
plain in-memory implementation, independent of the streaming converter's byte offsets.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ds_train.checkpoint.integrity import manifest_problems
from ds_train.checkpoint.layout import HF_CONFIG_DIR, recorded_state
from ds_train.checkpoint.nvme_optimizer import LAYOUT_KEY as SWAP_LAYOUT_KEY
from ds_train.convert.hf_dir import load_config, model_class
from ds_train.convert.safe_load import load_checkpoint_file
from ds_train.convert.to_hf import resolve_tag_dir
from ds_train.convert.zero_layout import (
    CheckpointError,
    is_universal,
    rank_sorted,
    universal_fp32,
    universal_param,
)

LOGIT_TOLERANCE = 1e-5


@dataclass
class VerifyReport:
    checked: int = 0
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    max_logit_diff: float = math.inf
    logits_shape: tuple = ()
    files_checked: int = 0  # checkpoint files compared with the sha256 recorded at save
    file_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            not self.mismatched
            and not self.missing
            and not self.file_problems
            and self.max_logit_diff <= LOGIT_TOLERANCE
        )

    def summary_line(self) -> str:
        return (
            f"{self.checked} tensors compared, {len(self.mismatched)} differ, {len(self.missing)} missing; "
            f"{len(self.file_problems)} checkpoint files damaged; "
            f"logits max |diff| {self.max_logit_diff:.3g} (tolerance {LOGIT_TOLERANCE:g})"
        )

    def render(self, ckpt: Path, hf_dir: Path) -> str:
        lines = [
            f"checkpoint: {ckpt}",
            f"HF dir:     {hf_dir}",
            "",
            f"checkpoint: {self.files_checked} files against the sha256 recorded at save, "
            f"{len(self.file_problems)} damaged",
            *(f"            ✗ {p}" for p in self.file_problems[:8]),
            f"tensors:    {self.checked} compared bitwise, {len(self.mismatched)} differ, {len(self.missing)} missing",
        ]
        for name in (self.mismatched + self.missing)[:8]:
            lines.append(f"            ✗ {name}")
        lines.append(
            f"logits:     fixed batch {list(self.logits_shape)}, max |diff| {self.max_logit_diff:.3g} "
            f"(tolerance {LOGIT_TOLERANCE:g})"
        )
        lines += ["", "OK: the HF directory holds the checkpoint's model" if self.ok else "MISMATCH"]
        return "\n".join(lines)


def _with_swapped(
    tag_dir: Path, rank: int, flats: list[torch.Tensor], layout: list[dict] | None
) -> list[torch.Tensor]:
    """A rank's flat groups, the ones NVMe offload swapped out read from their swap files (the
    optimizer file holds an empty tensor for them; ds_train recorded their files and sizes)."""
    if not layout:
        return flats
    out = []
    for t, entry in zip(flats, layout, strict=True):
        if entry["swap_file"] is None:
            out.append(t)
            continue
        raw = (tag_dir / "offloaded_tensors" / f"rank{rank:02d}" / entry["swap_file"]).read_bytes()
        out.append(torch.frombuffer(bytearray(raw), dtype=t.dtype)[: entry["numel"]])
    return out


def reference_state_dict(tag_dir: Path, recorded: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's fp32 master weights (plus frozen params and buffers), consolidated in memory.
    `recorded`: the checkpoint's ds_train_state.json ({} for plain DeepSpeed)."""
    model_files = rank_sorted(glob.glob(str(tag_dir / "*model_states.pt")))
    optim_files = rank_sorted(glob.glob(str(tag_dir / "*optim_states.pt")))
    models = [load_checkpoint_file(f, mmap=False) for f in model_files]
    m0 = models[0]
    state: dict[str, torch.Tensor] = {
        n: m0["module"][n] for n in m0.get("buffer_names") or [] if n in m0["module"]
    }
    optims = [load_checkpoint_file(f, mmap=False)["optimizer_state_dict"] for f in optim_files]
    world = len(optims)
    if is_universal(tag_dir, recorded):  # each parameter whole in zero/<name>/fp32.pt
        for group in m0["param_shapes"]:
            for name, shape in group.items():
                path = universal_fp32(tag_dir, name)
                state[name] = universal_param(load_checkpoint_file(path, mmap=False), path).reshape(shape)
        state.update(_frozen_params(models))
    elif optims and "fp32_flat_groups" in optims[0]:  # ZeRO-3
        swapped = recorded.get(SWAP_LAYOUT_KEY)
        flats = [
            torch.cat(_with_swapped(tag_dir, r, o["fp32_flat_groups"], swapped)) for r, o in enumerate(optims)
        ]
        offset = 0
        for group in m0["param_shapes"]:
            for name, shape in group.items():
                n, per = math.prod(shape), math.ceil(math.prod(shape) / world)
                state[name] = torch.cat([f[offset : offset + per] for f in flats])[:n].view(shape)
                offset += per
        state.update(_frozen_params(models))
    elif optims and "single_partition_of_fp32_groups" in optims[0]:  # ZeRO-1/2
        paddings = optims[0].get("param_alignment_paddings")
        for g, group in enumerate(m0["param_shapes"]):
            full = torch.cat([o["single_partition_of_fp32_groups"][g] for o in optims])
            offset = 0
            for i, (name, shape) in enumerate(group.items()):
                state[name] = full[offset : offset + math.prod(shape)].view(shape)
                offset += math.prod(shape) + (paddings[g][i] if paddings is not None else 0)
        for name in m0.get("frozen_param_shapes") or {}:
            state[name] = m0["frozen_param_fragments"][name]
    else:  # ZeRO-0, fp32: the module holds the master weights
        state.update(m0["module"])
    for alias, source in (m0.get("shared_params") or {}).items():
        if source in state:
            state[alias] = state[source]
    return state


def _frozen_params(models: list[dict]) -> dict[str, torch.Tensor]:
    """Frozen parameters whole: each one's fragments from every model-states file, concatenated and
    trimmed (partitioned at ZeRO-3; a universal checkpoint keeps the source's files)."""
    out = {}
    for name, shape in (models[0].get("frozen_param_shapes") or {}).items():
        frags = [m["frozen_param_fragments"][name] for m in models]
        out[name] = torch.cat(frags)[: math.prod(shape)].view(shape)
    return out


def _hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def verify_conversion(
    ckpt: str | os.PathLike,
    hf_dir: str | os.PathLike,
    *,
    tag: str | None = None,
    model_config: str | os.PathLike | None = None,
) -> VerifyReport:
    tag_dir = resolve_tag_dir(ckpt, tag)
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir}: not a Hugging Face directory (no config.json)")
    report = VerifyReport()
    recorded = recorded_state(tag_dir)
    if recorded:  # ds_train checkpoints carry a manifest; plain DeepSpeed ones do not
        report.files_checked = len(recorded.get("files") or {})
        report.file_problems = manifest_problems(tag_dir, recorded)
        if report.file_problems:
            return report  # the reference itself is damaged: comparing against it means nothing
    reference = reference_state_dict(tag_dir, recorded)
    exported = _hf_tensors(hf_dir)
    for name, tensor in exported.items():
        ref = reference.get(name)
        report.checked += 1
        if ref is None or ref.shape != tensor.shape or not torch.equal(ref.to(tensor.dtype), tensor):
            report.mismatched.append(name)

    objective = recorded.get("objective")
    config = load_config(Path(model_config) if model_config else tag_dir / HF_CONFIG_DIR)
    cls = model_class(config, objective)
    loaded = cls.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()
    expected = loaded.state_dict()
    report.missing = [k for k in expected if k not in reference]
    if report.missing:
        return report
    reference_model = cls(config).to(torch.float32).eval()
    # A tied alias (GPT-2's lm_head.weight) is written once, under the embedding's name: it is
    # rounded like the tensor it shares storage with, or its unrounded copy, loaded last into the
    # shared weight, would make a correct bf16/fp16 export fail the logit check.
    exported_at = {v.data_ptr(): k for k, v in expected.items() if k in exported}

    def export_dtype(k: str) -> torch.dtype:
        source = k if k in exported else exported_at.get(expected[k].data_ptr())
        return exported[source].dtype if source is not None else reference[k].dtype

    rounded = {k: reference[k].to(export_dtype(k)).to(expected[k].dtype) for k in expected}
    reference_model.load_state_dict(rounded, strict=True)
    gen = torch.Generator().manual_seed(0)
    vocab = getattr(config, "vocab_size", 256)
    batch = torch.randint(0, vocab, (2, 16), generator=gen)
    with torch.no_grad():
        a = loaded(input_ids=batch).logits.float()
        b = reference_model(input_ids=batch).logits.float()
    report.logits_shape = tuple(a.shape)
    report.max_logit_diff = float((a - b).abs().max())
    return report
