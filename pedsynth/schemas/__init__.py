"""Arrow schemas of every table and the pydantic run config."""

from pedsynth.schemas.config import BuildConfig, ConfigError, SourceConfig, load_config
from pedsynth.schemas.tables import (
    CATALOG_SCHEMA,
    PAIRS_SCHEMA,
    REJECTS_SCHEMA,
    SCHEMA_VERSION,
    pairs_table,
    rejects_table,
    stable_id,
)

__all__ = [
    "BuildConfig",
    "CATALOG_SCHEMA",
    "ConfigError",
    "PAIRS_SCHEMA",
    "REJECTS_SCHEMA",
    "SCHEMA_VERSION",
    "SourceConfig",
    "load_config",
    "pairs_table",
    "rejects_table",
    "stable_id",
]
