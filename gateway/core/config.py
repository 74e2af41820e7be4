"""config.yaml: loaded with line numbers, validated by JSON Schema, errors that name file, key and line."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from gateway.core.ack import AckTiming
from gateway.core.errors import ConfigError

Path_ = tuple[str | int, ...]


def key_name(path: Path_) -> str:
    """('channels', 0, 'ack', 'timing') → 'channels[0].ack.timing'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "<root>"


class Config:
    """The parsed configuration plus where each key was written, for precise errors."""

    def __init__(self, data: dict[str, Any], file: str, lines: dict[Path_, int]) -> None:
        self.data = data
        self.file = file
        self._lines = lines

    def line_of(self, path: Path_) -> int | None:
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return None

    def error(self, path: Path_, reason: str) -> ConfigError:
        return ConfigError(reason, file=self.file, key=key_name(path), line=self.line_of(path))

    def validate(self, schema: Mapping[str, Any], data: Any, at: Path_ = ()) -> None:
        """Validate ``data`` (found at ``at``) and raise the most relevant error, located."""
        validator = jsonschema.Draft202012Validator(schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(data))
        if error is None:
            return
        path: Path_ = at + tuple(error.absolute_path)
        reason = error.message
        if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
            allowed = set(error.schema.get("properties", {}))
            extra = sorted(k for k in error.instance if k not in allowed)
            if extra:
                path = (*path, extra[0])
                reason = f"unknown key; allowed here: {', '.join(sorted(allowed))}"
        elif error.validator == "required":
            reason = error.message.replace("is a required property", "is required")
        raise self.error(path, reason)


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
    text = resources.files("gateway.core").joinpath("schema/config.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


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
    config = Config(data, file, lines)
    config.validate(schema(), data)
    _check_names(config)
    return config


def load(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text("utf-8")
    except FileNotFoundError as exc:
        raise ConfigError("file not found", file=str(p)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=str(p)) from exc
    return parse(text, str(p))


def _unique(config: Config, items: Sequence[Mapping[str, Any]], where: Path_) -> None:
    seen: set[str] = set()
    for i, item in enumerate(items):
        name = item["name"]
        if name in seen:
            raise config.error((*where, i, "name"), f"duplicate name {name!r}")
        seen.add(name)


def _check_names(config: Config) -> None:
    data = config.data
    _unique(config, data["sources"], ("sources",))
    _unique(config, data["channels"], ("channels",))
    sources = {s["name"] for s in data["sources"]}
    for i, channel in enumerate(data["channels"]):
        if channel["source"] not in sources:
            raise config.error(
                ("channels", i, "source"),
                f"no source named {channel['source']!r}; known: {', '.join(sorted(sources))}",
            )
        _unique(config, channel["destinations"], ("channels", i, "destinations"))
        queued = channel.get("queue", True)
        try:  # the schema names the values; parsed here so that code compares members only
            timing = AckTiming.of(channel)
        except ValueError as exc:
            raise config.error(("channels", i, "ack", "timing"), str(exc)) from exc
        if "timing" in channel.get("ack", {}):
            channel["ack"]["timing"] = timing
        if queued and timing.waits:
            raise config.error(
                ("channels", i, "ack", "timing"),
                f"{timing.value!r} needs 'queue: false'; a queued channel acknowledges before processing",
            )
