"""The gateway's settings: typed, built once at load, every default in one place, rules checked there."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest

from gateway import config
from gateway.core.ack import AckTiming
from gateway.core.errors import ConfigError
from gateway.engine.link import dumps
from tests.core.test_config import GOOD


def test_a_config_that_sets_nothing_has_the_documented_defaults() -> None:
    s = config.parse(GOOD, "c.yaml").settings
    assert (s.data_dir, s.log_level, s.workers, s.drain_timeout_s) == (Path("var"), "info", 1, 10.0)
    assert s.http == config.HttpSettings(
        host="127.0.0.1",
        port=8080,
        enabled=True,
        tls=None,
        max_body_bytes=32 * 1024 * 1024,
        max_header_bytes=8190,
        rate_limit=config.RateLimit(requests_per_s=200.0, burst=400),
    )
    assert s.auth == config.AuthSettings(tokens=(), jwt=None, admin_token_file=Path("var/admin-token"))
    assert not s.auth.has_admin_credential
    assert s.retention == config.Retention(payload_days=30.0, message_days=90.0, sweep_interval_s=3600.0)
    assert s.store == config.StoreSettings(backend="sqlite", dsn=None, schema=None, pool_size=8)
    assert s.journal == config.JournalSettings(
        backend="sqlite",
        url=None,
        stream_prefix="PASSERELLE",
        partitions=32,
        dedupe_window_s=120.0,
        ack_wait_s=5.0,
        synchronous="FULL",
        max_batch=4096,
    )
    assert s.export == config.ExportSettings(directory=Path("var/exports"), file_ttl_s=3600.0, max_running=2)
    assert (s.documents.mode, s.documents.valuesets, s.console.locale) == ("pdsm", None, "fr-FR")
    assert s.namespaces == {}
    assert s == config.defaults()


def test_written_settings_are_typed_and_frozen() -> None:
    text = GOOD + (
        "data_dir: /srv/gw\nworkers: 0\ndrain_timeout_s: 3\n"
        "http: {port: 9000, rate_limit: {requests_per_s: 5}}\n"
        "retention: {payload_days: 7}\nexport: {max_running: 4}\n"
        "auth: {tokens: [{token: admin-token-0123456789, subject: a, role: admin}]}\n"
    )
    s = config.parse(text, "c.yaml").settings
    assert (s.data_dir, s.workers, s.drain_timeout_s) == (Path("/srv/gw"), 0, 3.0)
    assert isinstance(s.drain_timeout_s, float) and isinstance(s.http.rate_limit.requests_per_s, float)
    assert (s.http.port, s.http.rate_limit) == (9000, config.RateLimit(requests_per_s=5.0, burst=400))
    assert s.retention.payload_days == 7.0 and s.retention.message_days == 90.0
    # paths under data_dir follow it
    assert s.export == config.ExportSettings(directory=Path("/srv/gw/exports"), max_running=4)
    assert s.auth.admin_token_file == Path("/srv/gw/admin-token") and s.auth.has_admin_credential
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.workers = 2  # type: ignore[misc]


def test_the_command_line_overrides_and_what_follows_data_dir_moves_with_it() -> None:
    cfg = config.parse(GOOD + "http: {port: 9000}\n", "c.yaml")
    assert cfg.overridden() is cfg
    s = cfg.overridden(data_dir=Path("/d"), http_port=0, workers=0).settings
    assert (s.data_dir, s.http.port, s.workers) == (Path("/d"), 0, 0)
    assert (s.export.directory, s.auth.admin_token_file) == (Path("/d/exports"), Path("/d/admin-token"))
    assert cfg.settings.http.port == 9000  # the loaded configuration is left as it was
    s = cfg.overridden(journal_url="nats://n:4222", store_dsn="postgresql://p/db").settings
    assert (s.journal.backend, s.journal.url) == ("nats", "nats://n:4222")
    assert (s.store.backend, s.store.dsn) == ("postgresql", "postgresql://p/db")


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [
        ("store: {backend: postgresql}\n", "store.dsn", "needs a dsn"),
        ("store: {backend: postgresql, dsn: 'mysql://h/db'}\n", "store.dsn", "expected postgresql://"),
        ("journal: {backend: nats}\n", "journal.url", "needs a url"),
        ("journal: {backend: nats, url: 'http://h:4222'}\n", "journal.url", "expected nats://"),
        ("journal: {backend: nats, url: 'nats://h:4222'}\n", "store.backend", "needs the postgresql store"),
    ],
)
def test_the_backend_rules_are_checked_at_load(extra: str, key: str, reason: str) -> None:
    text = GOOD + extra
    with pytest.raises(ConfigError) as info:
        config.parse(text, "c.yaml")
    err = info.value
    assert (err.file, err.key) == ("c.yaml", key) and reason in err.reason
    # the line of the key's section; none when the section is not written (store, here)
    assert err.line == (len(GOOD.splitlines()) + 1 if extra.startswith(key.split(".")[0]) else None)


def test_a_waiting_ack_with_the_nats_journal_is_refused_at_load_and_on_override() -> None:
    waits = GOOD.replace("    source: hospital\n", "    source: hospital\n    queue: false\n") + (
        "store: {backend: postgresql, dsn: 'postgresql://p/db'}\n"
    )
    waits = waits.replace("    queue: false\n", "    queue: false\n    ack: {timing: after_delivery}\n")
    cfg = config.parse(waits, "c.yaml")  # the SQLite journal: the ACK may wait
    with pytest.raises(ConfigError) as info:
        cfg.overridden(journal_url="nats://n:4222")
    assert (info.value.key, info.value.line) == ("channels[0].ack.timing", 9)
    with pytest.raises(ConfigError, match="needs the postgresql store"):
        config.parse(GOOD, "c.yaml").overridden(journal_url="nats://n:4222")


def test_a_config_crosses_to_the_worker_whole() -> None:
    cfg = config.parse(
        GOOD.replace(
            "    source: hospital\n",
            "    source: hospital\n    queue: false\n    ack: {timing: after_transform}\n",
        ),
        "c.yaml",
    )
    again = pickle.loads(dumps(cfg))  # noqa: S301 - as the worker link carries it; bytes made here
    assert again.settings == cfg.settings and again.file == "c.yaml"
    assert again.line_of(("channels", 0, "ack", "timing")) == 9  # worker errors keep their lines
    assert again.data["channels"][0]["ack"]["timing"] is AckTiming.AFTER_TRANSFORM


def test_from_data_checks_as_parse_does() -> None:
    cfg = config.parse(GOOD, "c.yaml")
    assert config.from_data({**cfg.data, "workers": 3}, "c.yaml").settings.workers == 3
    with pytest.raises(ConfigError) as info:
        config.from_data({**cfg.data, "workers": "three"}, "c.yaml")
    assert (info.value.key, info.value.line) == ("workers", None)


def test_every_key_the_schema_allows_has_a_typed_setting() -> None:
    top = config.schema()["properties"]
    sections = {
        "http": config.HttpSettings,
        "retention": config.Retention,
        "store": config.StoreSettings,
        "journal": config.JournalSettings,
        "export": config.ExportSettings,
        "documents": config.DocumentSettings,
        "console": config.ConsoleSettings,
        "auth": config.AuthSettings,
    }
    for key, cls in sections.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(top[key]["properties"]) == fields, key
    rate_limit = top["http"]["properties"]["rate_limit"]["properties"]
    assert set(rate_limit) == {f.name for f in dataclasses.fields(config.RateLimit)}
    settings = {f.name for f in dataclasses.fields(config.Settings)}
    # channels and sources stay their connectors' mappings; node_name is not read by the gateway
    assert set(top) - settings == {"sources", "channels", "node_name"}
