"""Which journal, message store and FHIR repository a gateway runs on, from config.yaml and the CLI.

    journal: {backend: sqlite}                 store: {backend: sqlite}        the default, one node
    journal: {backend: sqlite}                 store: {backend: postgresql}    one node, PostgreSQL
    journal: {backend: nats, url: nats://…}    store: {backend: postgresql}    several nodes

With the nats journal the message state must be shared, so the store must be PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.core.ack import AckTiming
from gateway.core.config import Config
from gateway.store.documents import BaseDocumentStore, Mode, SqliteDocumentStore, ValueSets
from gateway.store.fhir import FhirRepository, SqliteFhirRepository
from gateway.store.nats_journal import JetStreamStore, NatsJournal
from gateway.store.pg_documents import PgDocumentStore
from gateway.store.pg_fhir import PgFhirRepository
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SqliteStore


@dataclass(frozen=True, slots=True)
class Backend:
    """What the chosen message store can do, in the terms its callers ask about."""

    name: str  # "sqlite", "postgres" or "jetstream"
    journal: str  # where appends go: "sqlite", "postgresql" (the store itself) or "nats"
    # Several nodes may run on the same backends.
    shared_between_nodes: bool
    # Worker processes take the channels off the main process: they exist for the single SQLite
    # writer; on a database server nodes scale instead.
    worker_processes: bool
    # The audit log records receipts by following the journal's file (no cost on the intake path).
    audit_follows_journal: bool


SQLITE = Backend(
    "sqlite", "sqlite", shared_between_nodes=False, worker_processes=True, audit_follows_journal=True
)
POSTGRES = Backend(
    "postgres", "postgresql", shared_between_nodes=False, worker_processes=False, audit_follows_journal=False
)
JETSTREAM = Backend(
    "jetstream", "nats", shared_between_nodes=True, worker_processes=False, audit_follows_journal=False
)


@dataclass(frozen=True, slots=True)
class Backends:
    store: SqliteStore | PostgresStore
    backend: Backend
    # The store again when it is on PostgreSQL: it keeps the settings every node must agree on
    # (the partition key), and the FHIR repository lives in its database.
    postgres: PostgresStore | None = None
    jetstream: JetStreamStore | None = None  # the store again, when appends go to JetStream

    @property
    def repository_settings(self) -> dict[str, Any]:
        """Where the FHIR repository lives when it is shared: the store's database and schema."""
        if self.postgres is None:
            return {}
        schema = self.postgres.schema
        return {"dsn": self.postgres.dsn, **({"schema": schema} if schema else {})}

    def fhir_repository(self, data_dir: Path) -> FhirRepository:
        """The node's FHIR repository (and so its document store): beside the message store."""
        if self.postgres is not None:
            return PgFhirRepository(self.postgres.dsn, schema=self.postgres.schema)
        return SqliteFhirRepository(data_dir / "fhir.db")


def document_store(
    repository: FhirRepository, *, mode: Mode | str = Mode.PDSM, valuesets: ValueSets | None = None
) -> BaseDocumentStore | None:
    """The document store beside a built-in repository (SQLite or PostgreSQL); None for any other."""
    if isinstance(repository, SqliteFhirRepository):
        return SqliteDocumentStore(repository, mode=mode, valuesets=valuesets)
    if isinstance(repository, PgFhirRepository):
        return PgDocumentStore(repository, mode=mode, valuesets=valuesets)
    return None


def select(
    config: Config, data_dir: Path, *, journal_url: str | None = None, store_dsn: str | None = None
) -> Backends:
    """Build (not open) the store; a contradiction in the settings is a ConfigError naming the key."""
    data = config.data
    journal: dict[str, Any] = dict(data.get("journal", {}))
    store: dict[str, Any] = dict(data.get("store", {}))
    if journal_url:
        journal.update(backend="nats", url=journal_url)
    if store_dsn:
        store.update(backend="postgresql", dsn=store_dsn)
    journal_kind = journal.get("backend", "sqlite")
    store_kind = store.get("backend", "sqlite")
    if store_kind == "postgresql":
        dsn = store.get("dsn")
        if not dsn:
            raise config.error(
                ("store", "dsn"), "the postgresql store needs a dsn (postgresql://HOST:PORT/DB)"
            )
        if urlsplit(dsn).scheme not in ("postgres", "postgresql"):
            raise config.error(("store", "dsn"), f"expected postgresql://HOST:PORT/DB, got {dsn!r}")
    if journal_kind == "nats":
        url = journal.get("url")
        if not url:
            raise config.error(("journal", "url"), "the nats journal needs a url (nats://HOST:PORT)")
        if urlsplit(url).scheme not in ("nats", "tls"):
            raise config.error(("journal", "url"), f"expected nats://HOST:PORT, got {url!r}")
        if store_kind != "postgresql":
            raise config.error(
                ("store", "backend"),
                "the nats journal needs the postgresql store: the nodes share the message state",
            )
        for i, ch in enumerate(data.get("channels", [])):
            if ch.get("enabled", True) and AckTiming.of(ch).waits:
                # Another node may process the message: the ACK cannot wait for an outcome here.
                raise config.error(
                    ("channels", i, "ack", "timing"),
                    "with the nats journal the ACK follows the JetStream commit: use before_processing",
                )
        nats = NatsJournal(
            url,
            prefix=journal.get("stream_prefix", "PASSERELLE"),
            partitions=int(journal.get("partitions", 32)),
            dedupe_window_s=float(journal.get("dedupe_window_s", 120)),
            ack_wait_s=float(journal.get("ack_wait_s", 30)),
        )
        pg = JetStreamStore(
            store["dsn"], nats, schema=store.get("schema"), pool_size=int(store.get("pool_size", 8))
        )
        return Backends(pg, JETSTREAM, postgres=pg, jetstream=pg)
    if store_kind == "postgresql":
        postgres = PostgresStore(
            store["dsn"], schema=store.get("schema"), pool_size=int(store.get("pool_size", 8))
        )
        return Backends(postgres, POSTGRES, postgres=postgres)
    sqlite = SqliteStore(
        data_dir / "passerelle.db",
        synchronous=journal.get("synchronous", "FULL"),
        max_batch=journal.get("max_batch", 4096),
    )
    return Backends(sqlite, SQLITE)
