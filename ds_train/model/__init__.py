"""Building HF models from local configs or directories; initialisation; FLOPs."""
