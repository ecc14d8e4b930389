"""Other stacks' names for ds_train's settings, for "did you mean" on an unknown key.

Spelling distance finds `train.lr_rate` but not `learning_rate` (the transformers Trainer),
`train_iters` (Megatron) or `gradient_clipping` (DeepSpeed's JSON): people bring these names from
the tools they came from (sweep audit), so they are mapped here, by name, to where the setting lives.
"""

# name as other stacks spell it → the ds_train key (or a short explanation where there is none)
ALIASES: dict[str, str] = {
    # transformers TrainingArguments
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "max_grad_norm": "train.grad_clip",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size (= micro_batch_size × accumulation × ranks)",
    "warmup_ratio": "train.warmup_steps (a number of steps, not a fraction)",
    "lr_scheduler_type": "train.schedule",
    "logging_steps": "train.log_every",
    "save_steps": "train.save_every",
    "save_total_limit": "train.keep_last",
    "eval_interval": "train.eval_every",
    "evaluation_steps": "train.eval_every",
    "metric_for_best_model": "train.best_metric",
    "load_best_model_at_end": "train.keep_best",
    "adam_epsilon": "train.adam_eps",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "gradient_checkpointing": "model.activation_checkpointing",
    "model_name_or_path": "model.init_from",
    "max_seq_length": "finetune.seq_len (pretraining: the shards' sequence length)",
    # Megatron / gpt-neox / nanoGPT
    "train_iters": "train.max_steps",
    "max_iters": "train.max_steps",
    "total_steps": "train.max_steps",
    "lr_decay_style": "train.schedule",
    "lr_warmup_iters": "train.warmup_steps",
    "min_lr": "train.min_lr_ratio (a fraction of train.lr)",
    "clip_grad": "train.grad_clip",
    "log_interval": "train.log_every",
    "save_interval": "train.save_every",
    "micro_batch": "train.micro_batch_size",
    "global_batch": "train.global_batch_size",
    "seq_length": "finetune.seq_len (pretraining: the shards' sequence length)",
    "block_size": "finetune.seq_len (pretraining: the shards' sequence length)",
    # DeepSpeed's JSON
    "gradient_clipping": "train.grad_clip",
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "zero_stage": "zero.stage",
    "offload_optimizer_device": "zero.offload_optimizer",
}


def alias_of(key: str) -> str | None:
    """Where another stack's name for a setting lives in ds_train, or None."""
    return ALIASES.get(key.lower())
