"""Write a plain DeepSpeed checkpoint (no ds_train involved) of micro-llama with a frozen embedding.

Run per rank by torchrun: `python -m tests.distributed.plain_deepspeed_checkpoint OUT_DIR STAGE`. The conversion tests use it
as a checkpoint from someone else's training loop: no ds_train metadata, a frozen parameter. The
only ds_train code it runs is how it exits: without it, a rank sometimes aborted at interpreter
exit after its work was done (ds_train/distributed/process_exit.py).
"""

from __future__ import annotations

import sys

import deepspeed
import torch
import torch._dynamo  # imported before zero.Init patches tensor constructors
import torch.distributed as dist
import transformers.masking_utils  # noqa: F401 - likewise (it imports torch._dynamo lazily)
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

from ds_train.distributed.process_exit import exit_process
from tests.helpers import MICRO_LLAMA


def main() -> None:
    out, stage = sys.argv[1], int(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_allow_untested_optimizer": True,
    }
    keep = HfDeepSpeedConfig(ds_config) if stage == 3 else None  # noqa: F841 - must stay alive
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(str(MICRO_LLAMA), vocab_size=512)
    with deepspeed.zero.Init(enabled=stage == 3):
        model = AutoModelForCausalLM.from_config(config)
    model.model.embed_tokens.weight.requires_grad_(False)  # a frozen parameter
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    gen = torch.Generator().manual_seed(1 + engine.global_rank)
    for _ in range(2):
        batch = torch.randint(0, config.vocab_size, (2, 16), generator=gen)
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(out, tag="global_step2")
    if engine.global_rank == 0:
        config.to_json_file(f"{out}/model_config.json")  # what --model-config is given


if __name__ == "__main__":
    main()
    dist.barrier()
    dist.destroy_process_group()
    exit_process(0)
