"""Checkpoint conversion: ZeRO checkpoints → Hugging Face directories, verification, resharding
to another world size, and LoRA adapters (saving under ZeRO-3, merging)."""
