"""The rules between keys that a schema cannot say; each raises a ConfigError naming file, key and line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from gateway.config.locations import Locations, Path_
from gateway.core.ack import AckTiming

if TYPE_CHECKING:
    from gateway.config.settings import Settings


def _unique(at: Locations, items: Sequence[Mapping[str, Any]], where: Path_) -> None:
    seen: set[str] = set()
    for i, item in enumerate(items):
        name = item["name"]
        if name in seen:
            raise at.error((*where, i, "name"), f"duplicate name {name!r}")
        seen.add(name)


def check_names(data: dict[str, Any], at: Locations) -> None:
    """Unique names, channels naming a known source, and each channel's ACK timing (parsed to a
    member in place, so that code compares members only)."""
    _unique(at, data["sources"], ("sources",))
    _unique(at, data["channels"], ("channels",))
    sources = {s["name"] for s in data["sources"]}
    for i, channel in enumerate(data["channels"]):
        if channel["source"] not in sources:
            raise at.error(
                ("channels", i, "source"),
                f"no source named {channel['source']!r}; known: {', '.join(sorted(sources))}",
            )
        _unique(at, channel["destinations"], ("channels", i, "destinations"))
        queued = channel.get("queue", True)
        try:  # the schema names the values; parsed here so that code compares members only
            timing = AckTiming.of(channel)
        except ValueError as exc:
            raise at.error(("channels", i, "ack", "timing"), str(exc)) from exc
        if "timing" in channel.get("ack", {}):
            channel["ack"]["timing"] = timing
        if queued and timing.waits:
            raise at.error(
                ("channels", i, "ack", "timing"),
                f"{timing.value!r} needs 'queue: false'; a queued channel acknowledges before processing",
            )


def check_backends(settings: Settings, data: Mapping[str, Any], at: Locations) -> None:
    """The store and journal (after the command line's --store and --journal) must fit together."""
    store, journal = settings.store, settings.journal
    if store.backend == "postgresql":
        if not store.dsn:
            raise at.error(("store", "dsn"), "the postgresql store needs a dsn (postgresql://HOST:PORT/DB)")
        if urlsplit(store.dsn).scheme not in ("postgres", "postgresql"):
            raise at.error(("store", "dsn"), f"expected postgresql://HOST:PORT/DB, got {store.dsn!r}")
    if journal.backend != "nats":
        return
    if not journal.url:
        raise at.error(("journal", "url"), "the nats journal needs a url (nats://HOST:PORT)")
    if urlsplit(journal.url).scheme not in ("nats", "tls"):
        raise at.error(("journal", "url"), f"expected nats://HOST:PORT, got {journal.url!r}")
    if store.backend != "postgresql":
        raise at.error(
            ("store", "backend"),
            "the nats journal needs the postgresql store: the nodes share the message state",
        )
    for i, ch in enumerate(data.get("channels", [])):
        if ch.get("enabled", True) and AckTiming.of(ch).waits:
            # Another node may process the message: the ACK cannot wait for an outcome here.
            raise at.error(
                ("channels", i, "ack", "timing"),
                "with the nats journal the ACK follows the JetStream commit: use before_processing",
            )
