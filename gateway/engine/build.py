"""Building channels and connectors from a validated configuration.

Shared by the main process and the worker process, so a mistake in a connector's
settings is reported, with its file, key and line, before anything listens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import Config, Path_
from gateway.core.ack import AckTiming
from gateway.core.errors import ConfigError, PasserelleError
from gateway.core.protocols import ChannelStore
from gateway.core.tls import resolve_paths
from gateway.engine import registry
from gateway.engine.channel import ChannelRuntime, LaneChannel
from gateway.engine.pipeline import DestinationRuntime, Filter, Pipeline
from gateway.engine.retry import RetryPolicy
from gateway.engine.steps import Step
from gateway.hl7.charsets import codec_for

_COMMON_KEYS = frozenset({"name", "type", "retry"})


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """One enabled channel's settings, with where they were written."""

    index: int
    name: str
    source: str
    data: Mapping[str, Any]
    default_charset: str

    @property
    def at(self) -> Path_:
        return ("channels", self.index)

    @property
    def ack_timing(self) -> AckTiming:
        return AckTiming.of(self.data)

    @property
    def sending_application(self) -> str:
        return str(self.data.get("ack", {}).get("sending_application", "PASSERELLE"))

    @property
    def filter(self) -> Filter:
        return Filter.from_config(self.data.get("filter"))


class Builder:
    def __init__(
        self, config: Config, data_dir: Path, *, defaults: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        # Settings a connector type takes from the node unless its item sets them (e.g. the
        # repository destination writes to the node's shared PostgreSQL repository; every
        # mapping step reads the deployment's namespace table).
        self.defaults = {
            "fhir_mapping": {"namespaces": config.settings.namespaces},
            **(defaults or {}),
        }

    def expand(self, value: Any) -> Any:
        """``{data_dir}`` and ``{config_dir}`` in any string setting."""
        if isinstance(value, str):
            config_dir = str(Path(self.config.file).resolve().parent)
            return value.replace("{data_dir}", str(self.data_dir)).replace("{config_dir}", config_dir)
        if isinstance(value, list):
            return [self.expand(v) for v in value]
        if isinstance(value, dict):
            return {k: self.expand(v) for k, v in value.items()}
        return value

    def connector(self, group: str, item: Mapping[str, Any], at: Path_, *extra: Any) -> Any:
        kind = item["type"]
        factory = registry.lookup(group, kind)
        if factory is None:
            raise self.config.error(
                (*at, "type"), f"unknown type {kind!r}; available: {', '.join(registry.available(group))}"
            )
        settings = {**self.defaults.get(kind, {})}
        settings.update((k, v) for k, v in item.items() if k not in _COMMON_KEYS)
        if isinstance(settings.get("tls"), dict):  # TLS files are relative to the config file
            settings["tls"] = resolve_paths(settings["tls"], Path(self.config.file).resolve().parent)
        schema = dict(getattr(factory, "CONFIG_SCHEMA", {"type": "object"}))
        schema.setdefault("additionalProperties", False)
        schema.setdefault("properties", {})
        schema = {**schema, "properties": {**schema["properties"], **{k: {} for k in _COMMON_KEYS}}}
        self.config.validate(schema, item, at)
        try:
            return factory(item.get("name", kind), self.expand(settings), *extra)
        except (ValueError, TypeError, KeyError) as exc:
            raise self.config.error(at, f"invalid settings: {exc}") from exc
        except ConfigError as exc:
            if exc.line is not None or exc.key is None or exc.key not in item:
                raise  # placed in a file of its own (a mapping file, with its line)
            # a setting that names something missing (a mapping directory): the config's key too
            raise self.config.error((*at, exc.key), f"{exc.file}: {exc.reason}") from exc

    def channel_specs(self) -> list[ChannelSpec]:
        data = self.config.data
        sources = {s["name"]: (i, s) for i, s in enumerate(data["sources"])}
        specs = []
        for ci, ch in enumerate(data["channels"]):
            if not ch.get("enabled", True):
                continue
            src_index, src = sources[ch["source"]]
            charset = src.get("default_charset", "ASCII")
            try:
                codec_for(charset)
            except PasserelleError as exc:
                raise self.config.error(("sources", src_index, "default_charset"), exc.message) from exc
            specs.append(ChannelSpec(ci, ch["name"], ch["source"], ch, charset))
        return specs

    def channel(
        self, spec: ChannelSpec, store: ChannelStore, *, shard: tuple[int, int] | None = None
    ) -> ChannelRuntime:
        ch = spec.data
        dests = []
        for di, d in enumerate(ch["destinations"]):
            conn = self.connector("passerelle.destinations", d, (*spec.at, "destinations", di))
            dests.append(DestinationRuntime(d["name"], conn, RetryPolicy.from_config(d.get("retry"))))
        steps: list[Step] = []
        for si, s in enumerate(ch.get("steps", [])):
            step_item = {"name": f"{si + 1}-{s['type']}", **s}
            steps.append(self.connector("passerelle.steps", step_item, (*spec.at, "steps", si)))
        pipeline = Pipeline(
            name=spec.name,
            source=spec.source,
            store=store,
            filter=spec.filter,
            steps=steps,
            destinations=dests,
            queued=ch.get("queue", True),
            ack_timing=spec.ack_timing,
            dedupe=ch.get("dedupe", True),
            default_charset=spec.default_charset,
            sending_application=spec.sending_application,
        )
        return LaneChannel(
            pipeline,
            partitions=ch.get("partitions", 64),
            max_in_memory=ch.get("max_in_memory", 10_000),
            shard=shard,
        )
