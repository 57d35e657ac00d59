"""The typed configuration (schema.py), how a YAML file and command-line overrides become one
(load.py), and which fields are local paths (paths.py)."""
from .load import ConfigError, dump_config, load_config, parse_override
from .schema import Config

__all__ = ["Config", "ConfigError", "dump_config", "load_config", "parse_override"]
