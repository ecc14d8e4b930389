"""Side concerns of a run, one per file: metric sinks, progress, preemption signals."""

from ds_train.train.callbacks.base import Callback

__all__ = ["Callback"]
