"""The training loop, its schedule and callbacks, and the pretraining entry."""
