"""The gateway's configuration: read once at load into frozen, typed settings."""

from gateway.config.loader import Config, from_data, load, parse, schema
from gateway.config.locations import Locations, Path_, key_name
from gateway.config.settings import (
    AuthSettings,
    ConsoleSettings,
    DocumentSettings,
    ExportSettings,
    HttpSettings,
    JournalSettings,
    Overrides,
    RateLimit,
    Retention,
    Settings,
    StoreSettings,
    defaults,
)

__all__ = [
    "AuthSettings",
    "Config",
    "ConsoleSettings",
    "DocumentSettings",
    "ExportSettings",
    "HttpSettings",
    "JournalSettings",
    "Locations",
    "Overrides",
    "Path_",
    "RateLimit",
    "Retention",
    "Settings",
    "StoreSettings",
    "defaults",
    "from_data",
    "key_name",
    "load",
    "parse",
    "schema",
]
