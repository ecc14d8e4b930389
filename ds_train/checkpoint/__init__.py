"""Checkpoints: DeepSpeed engine state plus ds_train's own state, written atomically."""
