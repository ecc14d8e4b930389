"""The second baseline for bench_trainer.py: the transformers `Trainer` on the same DeepSpeed JSON.

Same model (same HF config), the DeepSpeed JSON from ds_train's builder passed as
`TrainingArguments(deepspeed=...)` (its batch, clipping and AdamW settings mirrored in the
arguments, which transformers checks), the same rows ds-train reads (bench_rows.py) in an
in-memory dataset, the same micro-batch and accumulation. The Trainer does its own sharding,
sampling and collation, as its users get it. Launched per rank by torchrun; prints one JSON line.

    python -m torch.distributed.run --nproc_per_node 2 bench/hf_trainer_loop.py RUN.yaml STEPS WARMUP
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
import time

import torch


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = torch.from_numpy(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        return {"input_ids": row, "labels": row}  # the model shifts the labels itself


def checkpointing_argument(arguments_class) -> str:
    """transformers 5.x renamed TrainingArguments' `gradient_checkpointing` (still the name in, e.g.,
    5.17) to `activation_checkpointing`: whichever this release has."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(arguments_class)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def main() -> None:
    from ds_train.distributed.engine import quiet_deepspeed

    quiet_deepspeed()
    import deepspeed
    from bench_rows import global_rows
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from ds_train.config import load_config
    from ds_train.distributed.deepspeed_config import build_deepspeed_config, resolve_precision
    from ds_train.model.build import load_hf_config, load_tokenizer

    cfg = load_config(sys.argv[1])
    steps, warmup = int(sys.argv[2]), int(sys.argv[3])
    # The process group first (as ds-train and the bare loop do): ZeRO-3's partitioned construction
    # reads the world size from it.
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    world = torch.distributed.get_world_size()
    ds_config = build_deepspeed_config(cfg, world)
    opt = ds_config["optimizer"]["params"]
    precision = resolve_precision(cfg.train.precision)
    # TrainingArguments (with deepspeed=) installs the HfDeepSpeedConfig ZeRO-3 construction needs,
    # so it is created before the model, as transformers documents.
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf_trainer_"),
        deepspeed=ds_config,
        per_device_train_batch_size=ds_config["train_micro_batch_size_per_gpu"],
        gradient_accumulation_steps=ds_config["gradient_accumulation_steps"],
        max_steps=steps,
        learning_rate=opt["lr"],
        adam_beta1=opt["betas"][0],
        adam_beta2=opt["betas"][1],
        adam_epsilon=opt["eps"],
        weight_decay=opt["weight_decay"],
        max_grad_norm=ds_config["gradient_clipping"],
        lr_scheduler_type="cosine",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=cfg.train.log_every,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=cfg.data.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        seed=cfg.run.seed,
        **{checkpointing_argument(TrainingArguments): cfg.model.activation_checkpointing},
    )
    tokenizer = load_tokenizer(cfg.model)
    hf_config = load_hf_config(cfg.model, tokenizer)
    model = AutoModelForCausalLM.from_config(
        hf_config, attn_implementation=cfg.model.attn_implementation, dtype=torch.float32
    )
    model.config.use_cache = False
    rows = global_rows(cfg, steps)

    class Clock(TrainerCallback):
        start: float | None = None
        end: float | None = None

        def __init__(self) -> None:
            # (wall, CPU) clock at the end of each step from WARMUP on
            self.marks: list[tuple[float, float]] = []

        def on_step_end(self, args, state, control, **kwargs):
            # Steps (warmup, steps] timed, as in the other loops: not start-up, not train()'s wrap-up.
            if state.global_step >= warmup:
                self.marks.append((time.perf_counter(), time.process_time()))
            if state.global_step == warmup:
                self.start = time.perf_counter()
            if state.global_step == steps:
                self.end = time.perf_counter()

    clock = Clock()
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(rows), callbacks=[clock])
    trainer.train()
    elapsed = clock.end - clock.start
    tokens = (steps - warmup) * ds_config["train_batch_size"] * rows.shape[1]
    if trainer.args.process_index == 0:
        print(
            json.dumps(
                {
                    "system": "hf_trainer",
                    "tokens_per_s": tokens / elapsed,
                    "step_time_s": elapsed / (steps - warmup),
                    "step_times": [b[0] - a[0] for a, b in itertools.pairwise(clock.marks)],
                    # CPU seconds of this process (all its threads): the work done, whatever the
                    # other users of the machine do.
                    "cpu_step_times": [b[1] - a[1] for a, b in itertools.pairwise(clock.marks)],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    from process_exit import leave

    main()
    leave()
