"""config.yaml: loaded with line numbers, validated by JSON Schema, errors that name file, key and line."""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from gateway.config import rules
from gateway.config.locations import Locations, Path_
from gateway.config.settings import Overrides, Settings, build
from gateway.core.errors import ConfigError


class Config:
    """A loaded configuration: the gateway's typed ``settings``, the parsed ``data`` (channels,
    sources and their connectors' settings are read from it), and where each key was written."""

    __slots__ = ("data", "locations", "settings")

    def __init__(self, data: dict[str, Any], locations: Locations, settings: Settings) -> None:
        self.data = data
        self.locations = locations
        self.settings = settings

    @property
    def file(self) -> str:
        return self.locations.file

    def line_of(self, path: Path_) -> int | None:
        return self.locations.line_of(path)

    def error(self, path: Path_, reason: str) -> ConfigError:
        return self.locations.error(path, reason)

    def validate(self, schema: Mapping[str, Any], data: Any, at: Path_ = ()) -> None:
        self.locations.validate(schema, data, at)

    def overridden(
        self,
        *,
        data_dir: Path | None = None,
        http_port: int | None = None,
        workers: int | None = None,
        journal_url: str | None = None,
        store_dsn: str | None = None,
    ) -> Config:
        """This configuration with the command line's settings over it, checked again."""
        over = Overrides(data_dir, http_port, workers, journal_url, store_dsn)
        if over == Overrides():
            return self
        return Config(self.data, self.locations, build(self.data, self.locations, over))


def _line_map(node: yaml.Node, path: Path_, out: dict[Path_, int]) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*path, str(key_node.value))
            out[key] = key_node.start_mark.line + 1
            _line_map(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, (*path, i), out)


def schema() -> dict[str, Any]:
    text = resources.files("gateway.config").joinpath("schema/config.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _checked(data: dict[str, Any], locations: Locations) -> Config:
    locations.validate(schema(), data)
    rules.check_names(data, locations)
    return Config(data, locations, build(data, locations))


def parse(text: str, file: str) -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise ConfigError(
            f"not valid YAML: {exc.problem}", file=file, line=mark.line + 1 if mark else None
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", file=file) from exc
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping", file=file, line=1)
    lines: dict[Path_, int] = {}
    if node is not None:
        _line_map(node, (), lines)
    return _checked(data, Locations(file, lines))


def from_data(data: dict[str, Any], file: str) -> Config:
    """A configuration already parsed (by a program that writes one): checked as ``parse`` does,
    errors without lines."""
    return _checked(data, Locations(file, {}))


def load(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except FileNotFoundError as exc:
        raise ConfigError("file not found", file=str(p)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=str(p)) from exc
    return parse(text, str(p))
