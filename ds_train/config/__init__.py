"""Run configuration: typed sections, YAML loading with overrides, validation."""

from ds_train.config.loader import ConfigError, describe, dump_yaml, from_dict, load_config, to_dict
from ds_train.config.schema import Config
from ds_train.config.validate import validate

__all__ = [
    "Config",
    "ConfigError",
    "describe",
    "dump_yaml",
    "from_dict",
    "load_config",
    "to_dict",
    "validate",
]
