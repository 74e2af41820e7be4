"""Which journal, message store and FHIR repository a gateway runs on, from config.yaml and the CLI.

    journal: {backend: sqlite}                 store: {backend: sqlite}        the default, one node
    journal: {backend: sqlite}                 store: {backend: postgresql}    one node, PostgreSQL
    journal: {backend: nats, url: nats://…}    store: {backend: postgresql}    several nodes

With the nats journal the message state must be shared, so the store must be PostgreSQL (a rule of
the loader, gateway.config.rules).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import Settings
from gateway.store.documents import BaseDocumentStore, Mode, SqliteDocumentStore, ValueSets
from gateway.store.documents.postgres import PgDocumentStore
from gateway.store.fhir import SqliteFhirRepository
from gateway.store.fhir_common import FhirRepository
from gateway.store.messages.postgres import PostgresStore
from gateway.store.messages.sqlite import SqliteStore
from gateway.store.nats_journal import JetStreamStore, NatsJournal
from gateway.store.pg_fhir import PgFhirRepository


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
    store: SqliteStore | PostgresStore | JetStreamStore
    backend: Backend
    # The PostgreSQL message store, when there is one: it keeps the settings every node must agree on
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


def select(settings: Settings, data_dir: Path) -> Backends:
    """Build (not open) the store the settings name; the loader has checked that they fit together."""
    store, journal = settings.store, settings.journal
    if journal.backend == "nats":
        assert journal.url is not None and store.dsn is not None  # checked at load
        nats = NatsJournal(
            journal.url,
            prefix=journal.stream_prefix,
            partitions=journal.partitions,
            dedupe_window_s=journal.dedupe_window_s,
            ack_wait_s=journal.ack_wait_s,
        )
        js = JetStreamStore(store.dsn, nats, schema=store.schema, pool_size=store.pool_size)
        return Backends(js, JETSTREAM, postgres=js.pg, jetstream=js)
    if store.backend == "postgresql":
        assert store.dsn is not None  # checked at load
        postgres = PostgresStore(store.dsn, schema=store.schema, pool_size=store.pool_size)
        return Backends(postgres, POSTGRES, postgres=postgres)
    sqlite = SqliteStore(
        data_dir / "passerelle.db", synchronous=journal.synchronous, max_batch=journal.max_batch
    )
    return Backends(sqlite, SQLITE)
