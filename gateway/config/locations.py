"""Where each key of config.yaml was written, so that an error names file, key and line."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema

from gateway.core.errors import ConfigError

Path_ = tuple[str | int, ...]


def key_name(path: Path_) -> str:
    """('channels', 0, 'ack', 'timing') → 'channels[0].ack.timing'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "<root>"


class Locations:
    """A configuration file's name and the line of each key in it."""

    __slots__ = ("_lines", "file")

    def __init__(self, file: str, lines: dict[Path_, int]) -> None:
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
