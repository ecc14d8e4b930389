"""The baseline for bench_trainer.py: the smallest correct DeepSpeed training loop.

Same model (built from the same HF config), same DeepSpeed JSON (from ds_train's builder, so the
ZeRO settings are identical), same batch shape and the same rows ds-train reads (bench_rows.py),
materialised before timing, so the baseline pays nothing for data loading. Launched per rank by
torchrun; prints one JSON line with tokens/s.

    python -m torch.distributed.run --nproc_per_node 2 bench/bare_deepspeed_loop.py RUN.yaml STEPS WARMUP
"""

from __future__ import annotations

import itertools
import json
import sys
import time

import torch


def main() -> None:
    from ds_train.distributed.engine import quiet_deepspeed

    quiet_deepspeed()
    import deepspeed
    from bench_rows import rank_micro_batches
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from ds_train.config import load_config
    from ds_train.distributed.deepspeed_config import build_deepspeed_config
    from ds_train.model.blocks import enable_activation_checkpointing
    from ds_train.model.build import load_hf_config, load_tokenizer

    cfg = load_config(sys.argv[1])
    steps, warmup = int(sys.argv[2]), int(sys.argv[3])
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    ds_config = build_deepspeed_config(cfg, world)
    keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 - ZeRO-3 construction needs it alive
    tokenizer = load_tokenizer(cfg.model)
    hf_config = load_hf_config(cfg.model, tokenizer)
    torch.manual_seed(cfg.run.seed)
    model = AutoModelForCausalLM.from_config(
        hf_config, attn_implementation=cfg.model.attn_implementation, dtype=torch.float32
    )
    model.config.use_cache = False
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    # On the device before the clock starts: a blocking copy from pageable memory per micro-batch
    # would drain the GPU each time, a cost of this loop's making that the comparison must not
    # charge to bare DeepSpeed (a few MB: no input pipeline at all, its best case).
    micro = [b.to(engine.device) for b in rank_micro_batches(cfg, world, rank, steps)]
    gas = ds_config["gradient_accumulation_steps"]
    seq = micro[0].shape[1]
    t_start = time.perf_counter()
    marks = []  # (wall, CPU) clock at the end of each step from WARMUP on (as the others)
    for step in range(steps):
        if step == warmup:
            t_start = time.perf_counter()
        for b in micro[step * gas : (step + 1) * gas]:
            loss = engine(input_ids=b, labels=b).loss  # HF shifts the labels itself
            engine.backward(loss)
            engine.step()
        torch.distributed.all_reduce(loss.detach())  # a logged loss, as any real loop has
        if step + 1 >= warmup:
            marks.append((time.perf_counter(), time.process_time()))
    elapsed = time.perf_counter() - t_start
    tokens = (steps - warmup) * ds_config["train_batch_size"] * seq
    if rank == 0:
        print(
            json.dumps(
                {
                    "system": "bare_deepspeed",
                    "tokens_per_s": tokens / elapsed,
                    "step_time_s": elapsed / (steps - warmup),
                    "step_times": [b[0] - a[0] for a, b in itertools.pairwise(marks)],
                    # CPU seconds of this process (all its threads): the work done, whatever the
                    # other users of the machine do.
                    "cpu_step_times": [b[1] - a[1] for a, b in itertools.pairwise(marks)],
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    from process_exit import leave

    main()
    leave()
