"""Launcher detection, the DeepSpeed config, and the engine: ds_train's one door to DeepSpeed."""
