"""Rank-0 progress: a tqdm bar on a terminal, one plain line per log step in batch logs."""

from __future__ import annotations

import sys

from tqdm import tqdm

from ds_train.train.callbacks.base import Callback


class Progress(Callback):
    def __init__(self, max_steps: int):
        self.max_steps = max_steps
        self.bar: tqdm | None = None
        self.interactive = sys.stderr.isatty()

    def on_train_start(self, trainer) -> None:
        if self.interactive:
            self.bar = tqdm(
                total=self.max_steps, initial=trainer.step, desc="train", unit="step", dynamic_ncols=True
            )

    def on_step_end(self, trainer) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, trainer, record: dict) -> None:
        text = format_record(record)
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
        else:
            print(f"step {record['step']}/{self.max_steps} {text}", file=sys.stderr, flush=True)

    def on_eval(self, trainer, record: dict) -> None:
        line = f"eval step {record['step']}:"
        if "valid_loss" in record:  # data.downstream alone evaluates no loss
            line += f" valid_loss {record['valid_loss']:.4f}"
        if "valid_ppl" in record:
            line += f" valid_ppl {record['valid_ppl']:.2f}"
        per_set = [
            f"{k.removeprefix('valid_loss/')} {v:.4f}"
            for k, v in record.items()
            if k.startswith("valid_loss/")
        ]
        if per_set:
            line += f" ({', '.join(per_set)})"
        tasks = [
            f"{k.removeprefix('downstream/')} {v:.3f}"
            for k, v in record.items()
            if k.startswith("downstream/")
        ]
        if tasks:  # data.downstream
            line += (" |" if "valid_loss" in record else "") + f" {', '.join(tasks)}"
        (self.bar.write if self.bar is not None else lambda s: print(s, file=sys.stderr, flush=True))(line)

    def on_train_end(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()


def format_record(record: dict) -> str:
    parts = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}", f"tok/s {record['tokens_per_s']:,.0f}"]
    if record.get("mfu") is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if record.get("peak_reserved_gib") is not None:
        parts.append(f"mem {record['peak_reserved_gib']:.1f} GiB")
        if record.get("alloc_retries"):  # the allocator is thrashing near the limit: say so
            parts.append(f"alloc retries {record['alloc_retries']}")
    if record.get("skipped_steps"):  # each skip is warned once; the line keeps the count in view
        parts.append(f"spikes skipped {record['skipped_steps']}")
    if record.get("data_wait_frac", 0) >= 0.01:  # an input stall is worth a glance; none is noise
        rank = f" (rank {record['data_wait_rank']})" if "data_wait_rank" in record else ""
        parts.append(f"data wait {100 * record['data_wait_frac']:.0f}%{rank}")
    return " ".join(parts)
