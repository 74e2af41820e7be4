"""What each backend the configuration chooses says it can do, and what the gateway makes of it."""

from __future__ import annotations

from pathlib import Path

import yaml

from gateway import config as config_mod
from gateway.app import Gateway
from gateway.store import backends
from gateway.store.messages.postgres import PostgresStore
from gateway.store.messages.sqlite import SqliteStore
from gateway.store.nats_journal import JetStreamStore
from tests.conftest import make_config
from tests.scale.conftest import PG_DSN


def _config(tmp_path: Path, **sections: object) -> config_mod.Config:
    cfg = make_config(tmp_path)
    data = {**cfg.data, "workers": 1, **sections}
    return config_mod.parse(yaml.safe_dump(data), cfg.file)


def test_sqlite_runs_one_node_with_workers_and_the_audit_follows_its_journal(tmp_path: Path) -> None:
    chosen = backends.select(_config(tmp_path).settings, tmp_path)
    assert chosen.backend is backends.SQLITE
    assert isinstance(chosen.store, SqliteStore)
    assert (chosen.postgres, chosen.jetstream, chosen.repository_settings) == (None, None, {})
    gw = Gateway(_config(tmp_path))
    assert gw.workers == 1
    assert gw.audit.journal == gw.data_dir / "passerelle.db"


def test_postgresql_keeps_the_shared_settings_and_the_repository_in_its_database(tmp_path: Path) -> None:
    store = {"backend": "postgresql", "dsn": PG_DSN, "schema": "site_a"}
    chosen = backends.select(_config(tmp_path, store=store).settings, tmp_path)
    assert chosen.backend is backends.POSTGRES
    assert isinstance(chosen.postgres, PostgresStore) and chosen.postgres is chosen.store
    assert chosen.jetstream is None
    assert chosen.repository_settings == {"dsn": PG_DSN, "schema": "site_a"}
    gw = Gateway(_config(tmp_path, store=store))
    assert gw.workers == 0  # nodes scale instead
    assert gw.audit.journal is None


def test_jetstream_is_shared_between_nodes(tmp_path: Path) -> None:
    journal = {"backend": "nats", "url": "nats://127.0.0.1:4222"}
    store = {"backend": "postgresql", "dsn": PG_DSN}
    chosen = backends.select(_config(tmp_path, journal=journal, store=store).settings, tmp_path)
    assert chosen.backend is backends.JETSTREAM and chosen.backend.shared_between_nodes
    assert isinstance(chosen.jetstream, JetStreamStore)
    # The JetStream journal holds the PostgreSQL store that keeps the trace and shared settings.
    assert chosen.jetstream is chosen.store and chosen.postgres is chosen.jetstream.pg
    assert chosen.repository_settings == {"dsn": PG_DSN}
