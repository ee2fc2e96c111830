"""Training: configuration (`config`), optimizer (`optim`), sharding (`sharding`), checkpoints
(`checkpoint`), logs (`metrics`) and the loop (`loop`). The command line is ``train.py``."""

from jamba_jax.train.config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config"]
