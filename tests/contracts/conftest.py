"""One contract per storage role, run on every backend of that role.

``messages``: the message store on SQLite, PostgreSQL, and JetStream (intake in NATS, trace in
PostgreSQL). ``repo``: the FHIR repository on SQLite and PostgreSQL; ``documents``: the document
store on that repository. The live backends get a fresh schema and stream prefix per test; without
the services they skip locally and fail under CI (``require_live``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats
import nats.js.errors
import pytest

from gateway.core.envelope import HL7_V2, Envelope
from gateway.core.ids import new_id
from gateway.core.protocols import AppendResult, MessageStore
from gateway.core.status import Status
from gateway.store.backends import document_store
from gateway.store.documents import BaseDocumentStore
from gateway.store.fhir import SqliteFhirRepository
from gateway.store.fhir_common import FhirRepository
from gateway.store.messages.postgres import PostgresStore
from gateway.store.messages.sqlite import SqliteStore
from gateway.store.nats_journal import JetStreamStore, NatsJournal, decode
from gateway.store.pg_fhir import PgFhirRepository
from tests.fhir.conftest import Clock
from tests.scale.conftest import NATS_URL, PG_DSN, LiveNames, require_live

MESSAGE_BACKENDS = [
    "sqlite",
    pytest.param("postgres", marks=pytest.mark.live),
    pytest.param("jetstream", marks=pytest.mark.live),
]
REPOSITORY_BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.live)]


def envelope(
    control_id: str,
    *,
    channel: str = "adt",
    raw: bytes | None = None,
    status: Status = Status.RECEIVED,
    at: float | None = None,
    partition_key: str = "pk-1",
    message_type: str = "ADT^A01",
    dedupe: bool = True,
) -> Envelope:
    """A synthetic envelope; its bytes follow the control id unless given."""
    return Envelope(
        id=new_id(),
        channel=channel,
        source="hospital",
        raw=raw
        if raw is not None
        else f"MSH|^~\\&|APP|FAC|||20240514||{message_type}|{control_id}|P|2.5\r".encode(),
        content_type=HL7_V2,
        sender="APP^FAC",
        control_id=control_id,
        message_type=message_type,
        partition_key=partition_key,
        received_at=at if at is not None else time.time(),
        trace_id=new_id(),
        charset="UTF-8",
        peer="127.0.0.1:1",
        status=status,
        dedupe=dedupe,
    )


@dataclass
class Messages:
    """A message store under test, and how a message it journaled reaches its table.

    On SQLite and PostgreSQL ``append`` writes the table itself. The JetStream store appends to
    the stream; the channel's consumer then admits each message into PostgreSQL. ``take`` does
    what that consumer does (fetch, admit, ack), so that the rest of the contract reads the same
    rows on every backend.
    """

    name: str
    store: MessageStore
    reopen_args: tuple[Any, ...]
    _subs: dict[str, Any] = field(default_factory=dict)

    @property
    def streamed(self) -> bool:
        return self.name == "jetstream"

    async def take(self, channel: str, count: int) -> list[AppendResult]:
        """Admit ``count`` messages waiting in ``channel``'s stream (JetStream only)."""
        store = self.store
        assert isinstance(store, JetStreamStore)
        sub = self._subs.get(channel)
        if sub is None:
            sub = self._subs[channel] = await store.journal.subscribe(channel, 0, max_deliver=5)
        admitted = []
        for _ in range(count):
            (msg,) = await sub.fetch(1, timeout=5)
            env, ack = decode(msg.data)
            result, _ = await store.admit(env, ack)
            await msg.ack_sync()
            admitted.append(result)
        return admitted

    async def journaled(
        self, envelopes: Sequence[Envelope], *, ack: tuple[bytes, str] | None = None
    ) -> list[AppendResult]:
        """Append, then (JetStream) admit what went to the stream: the results as the table has them."""
        results = await self.store.append(envelopes, ack=ack)
        if not self.streamed:
            return results
        streamed = [
            i
            for i, (e, r) in enumerate(zip(envelopes, results, strict=True))
            if e.status is Status.RECEIVED and not r.duplicate
        ]
        by_channel: dict[str, list[int]] = {}
        for i in streamed:
            by_channel.setdefault(envelopes[i].channel, []).append(i)
        for channel, indexes in by_channel.items():
            for i, admitted in zip(indexes, await self.take(channel, len(indexes)), strict=True):
                results[i] = admitted
        return results

    async def one(self, env: Envelope, *, ack: tuple[bytes, str] | None = None) -> AppendResult:
        (result,) = await self.journaled([env], ack=ack)
        return result

    def build(self) -> MessageStore:
        """Another store on the same data (the first one closed)."""
        if self.name == "sqlite":
            return SqliteStore(*self.reopen_args)
        if self.name == "postgres":
            dsn, schema = self.reopen_args
            return PostgresStore(dsn, schema=schema)
        dsn, schema, prefix = self.reopen_args
        return JetStreamStore(dsn, _journal(prefix), schema=schema)


class Leftovers:
    """The schemas and streams the live tests made, dropped together once the session ends: a few
    statements for every schema cost less than a connection and a commit per test."""

    def __init__(self) -> None:
        self.schemas: list[str] = []
        self.streams: list[str] = []

    def new(self, *, streams: bool = False) -> LiveNames:
        require_live()
        names = LiveNames()
        self.schemas.append(names.schema)
        if streams:
            self.streams += [f"{names.prefix}_IN", f"{names.prefix}_DLQ"]
        return names

    async def cleanup(self) -> None:
        conn = await asyncpg.connect(PG_DSN)
        try:
            for i in range(0, len(self.schemas), 16):  # bounded: each schema's tables take locks
                listed = ", ".join(f'"{name}"' for name in self.schemas[i : i + 16])
                await conn.execute(f"DROP SCHEMA IF EXISTS {listed} CASCADE")
        finally:
            await conn.close()
        if not self.streams:
            return
        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            for stream in self.streams:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_stream(stream)
        finally:
            await nc.close()


@pytest.fixture(scope="session")
def leftovers() -> Iterator[Leftovers]:
    made = Leftovers()
    yield made
    if made.schemas:
        asyncio.run(made.cleanup())


def _journal(prefix: str) -> NatsJournal:
    # One partition: every message of a channel comes from one consumer, in stream order.
    return NatsJournal(NATS_URL, prefix=prefix, partitions=1, ack_wait_s=5)


@pytest.fixture(params=MESSAGE_BACKENDS)
async def messages(
    request: pytest.FixtureRequest, tmp_path: Path, leftovers: Leftovers
) -> AsyncIterator[Messages]:
    if request.param == "sqlite":
        path = tmp_path / "passerelle.db"
        backend = Messages("sqlite", SqliteStore(path), (path,))
    else:
        names = leftovers.new(streams=request.param == "jetstream")
        if request.param == "postgres":
            backend = Messages("postgres", PostgresStore(PG_DSN, schema=names.schema), (PG_DSN, names.schema))
        else:
            backend = Messages(
                "jetstream",
                JetStreamStore(PG_DSN, _journal(names.prefix), schema=names.schema),
                (PG_DSN, names.schema, names.prefix),
            )
    await backend.store.open()
    try:
        yield backend
    finally:
        await backend.store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@dataclass
class Repository:
    """A FHIR repository under test and how to open another one on the same data."""

    name: str
    repo: FhirRepository
    path: Path | None = None
    schema: str | None = None

    def build(self, clock: Clock) -> FhirRepository:
        if self.path is not None:
            return SqliteFhirRepository(self.path, clock=clock)
        return PgFhirRepository(PG_DSN, schema=self.schema, clock=clock)


@pytest.fixture(params=REPOSITORY_BACKENDS)
async def repository(
    request: pytest.FixtureRequest, tmp_path: Path, clock: Clock, leftovers: Leftovers
) -> AsyncIterator[Repository]:
    if request.param == "sqlite":
        backend = Repository(
            "sqlite", SqliteFhirRepository(tmp_path / "fhir.db", clock=clock), path=tmp_path / "fhir.db"
        )
    else:
        names = leftovers.new()
        backend = Repository(
            "postgresql", PgFhirRepository(PG_DSN, schema=names.schema, clock=clock), schema=names.schema
        )
    await backend.repo.open()
    try:
        yield backend
    finally:
        await backend.repo.close()


@pytest.fixture
def repo(repository: Repository) -> FhirRepository:
    """The repository alone: the name the HTTP fixtures of tests/fhir and tests/documents use."""
    return repository.repo


@pytest.fixture
async def documents(repo: FhirRepository) -> BaseDocumentStore:
    store = document_store(repo)
    assert store is not None
    await store.open()
    return store
