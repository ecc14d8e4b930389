"""ds_train: distributed training of Hugging Face transformers on DeepSpeed ZeRO."""

__version__ = "0.1.0"
