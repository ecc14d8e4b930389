"""Training objectives: how packed token rows become model inputs, and the summed loss."""

from ds_train.objectives.base import Objective, build_objective

__all__ = ["Objective", "build_objective"]
