"""The run's configuration: the schema, and the loader that fills it from TOML and the command line."""

from titan_cp.config.manager import format_help, load_config
from titan_cp.config.schema import JobConfig

__all__ = ["JobConfig", "format_help", "load_config"]
