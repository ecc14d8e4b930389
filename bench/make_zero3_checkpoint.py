"""A ZeRO-3 checkpoint of a ~338 M-parameter Llama from a plain DeepSpeed loop (one AdamW step).

Launched per rank by torchrun from bench/bench_convert.py: `make_zero3_checkpoint.py OUT_DIR`.
fp32 throughout (CPU), so the checkpoint holds fp32 master partitions and Adam moments, as a
mixed-precision GPU run's would, at 16 bytes per parameter in total.
"""

from __future__ import annotations

import sys

import deepspeed
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.integrations import HfDeepSpeedConfig

# 20 layers × (4·1024² + 3·1024·3072) + 2 · 32000·1024 untied embeddings ≈ 338 M parameters
CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 20,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def main() -> None:
    out = sys.argv[1]
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
        "zero_allow_untested_optimizer": True,
    }
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 - from_config builds under zero.Init while alive
    torch.manual_seed(0)
    config = LlamaConfig(**CONFIG)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    batch = torch.randint(0, config.vocab_size, (1, 16))
    engine.backward(engine(input_ids=batch, labels=batch).loss)
    engine.step()
    engine.save_checkpoint(out, tag="global_step1")
    if engine.global_rank == 0:
        config.to_json_file(f"{out}/config.json")
        n = sum(p.ds_numel for p in engine.module.parameters())
        print(f"parameters: {n / 1e6:.1f} M", flush=True)


if __name__ == "__main__":
    main()
