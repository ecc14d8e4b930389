"""Fine-tuning (`ds-train finetune`): SFT, sequence classification and masked-LM continued
pretraining on top of the pretraining loop, from an HF directory or a ds_train run directory,
with full fine-tuning or LoRA adapters (peft). See docs/finetune.md."""
