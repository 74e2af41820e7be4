"""Destination into the built-in FHIR repository: the channel's transaction Bundle is applied there.

The Bundle's conditional creates/updates make a replayed message leave the
repository as it was. Runs where the channel runs (the worker process by
default), on its own connection to the repository's SQLite file (``path``) or,
with ``dsn``, to the PostgreSQL repository that several nodes share. A node whose
store is PostgreSQL gives its ``dsn`` and ``schema`` to this destination, so that
the channels write where /fhir reads.

A Bundle that carries a DocumentReference (MDM, ORU with an embedded document) is published
through the document store, by the same code path as ITI-65: a SubmissionSet is added when the
message brought none (one per message, so a replay adds no second one), the bytes are kept once
with their size and hash checked, a replacement supersedes the old document, a deletion is
logical. The feed acts as the gateway itself: the author-only delete rule is for HTTP callers.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.core.envelope import FHIR_JSON, Envelope
from gateway.core.errors import HttpError, PermanentDeliveryError, RetryLater, StoreError
from gateway.core.protocols import DeliveryResult
from gateway.core.status import Status
from gateway.store.backends import document_store
from gateway.store.documents import FEED, BaseDocumentStore, Mode, with_submission_set
from gateway.store.fhir import SqliteFhirRepository
from gateway.store.fhir_common import FhirRepository
from gateway.store.pg_fhir import PgFhirRepository

# Names each message's SubmissionSet: the same message always gives the same identifier.
_SUBMISSIONS = uuid.UUID("8f1d8a52-6a51-4c36-9d38-52c1e3a5b7f0")


def carries_documents(bundle: Mapping[str, Any]) -> bool:
    return any(
        isinstance(e, dict) and (e.get("resource") or {}).get("resourceType") == "DocumentReference"
        for e in bundle.get("entry") or ()
    )


class FhirRepositoryDestination:
    """Implements ``gateway.core.protocols.Destination``."""

    CONFIG_SCHEMA: Mapping[str, Any] = {
        "type": "object",
        "anyOf": [{"required": ["path"]}, {"required": ["dsn"]}],
        "properties": {
            "path": {"type": "string", "minLength": 1},  # SQLite file
            "dsn": {"type": "string", "pattern": "^postgres(ql)?://"},  # PostgreSQL; wins over path
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_]{1,63}$"},
            "documents": {"enum": [m.value for m in Mode]},  # metadata checks: pdsm (warn) or dmp
        },
    }

    def __init__(self, name: str, settings: Mapping[str, Any]) -> None:
        self.name = name
        self.repository: FhirRepository
        if settings.get("dsn"):
            self.repository = PgFhirRepository(settings["dsn"], schema=settings.get("schema"))
        else:
            self.repository = SqliteFhirRepository(Path(settings["path"]))
        documents = document_store(self.repository, mode=settings.get("documents", Mode.PDSM))
        assert documents is not None  # both built-in repositories have their document store
        self.documents: BaseDocumentStore = documents
        self._opened = False

    async def send(self, envelope: Envelope, payload: bytes) -> DeliveryResult:
        if "fhir" not in envelope.content_type and not payload.lstrip().startswith(b"{"):
            raise PermanentDeliveryError("the repository takes FHIR JSON; add a fhir_mapping step")
        try:
            bundle = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise PermanentDeliveryError("the payload is not JSON") from exc
        if not isinstance(bundle, dict):
            raise PermanentDeliveryError("the payload is not a FHIR Bundle")
        try:
            if not self._opened:
                await self.repository.open()
                self._opened = True
            if carries_documents(bundle):
                # Through the store, never as plain resources: the DMP rules (hash, replacement) apply.
                submission = f"urn:uuid:{uuid.uuid5(_SUBMISSIONS, envelope.id)}"
                when = datetime.fromtimestamp(envelope.received_at, UTC).isoformat(timespec="seconds")
                response = await self.documents.publish(with_submission_set(bundle, submission, when), FEED)
            else:
                # Parsed here for this send alone: the repository need not copy it.
                response = await self.repository.transaction(bundle, copy=False)
        except HttpError as exc:  # the Bundle itself is at fault: no retry will change it
            raise PermanentDeliveryError(f"repository refused the transaction: {exc.message}") from exc
        except StoreError as exc:
            raise RetryLater(f"repository unavailable: {exc.message}") from exc
        return DeliveryResult(Status.SENT, "transaction applied", orjson.dumps(response), FHIR_JSON)

    async def aclose(self) -> None:
        if self._opened:
            await self.repository.close()
            self._opened = False
