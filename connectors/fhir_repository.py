"""Destination into the built-in FHIR repository: the channel's transaction Bundle is applied there.

The Bundle's conditional creates/updates make a replayed message leave the
repository as it was. Runs where the channel runs (the worker process by
default), on its own connection to the repository's SQLite file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from gateway.core.envelope import FHIR_JSON, Envelope
from gateway.core.errors import HttpError, PermanentDeliveryError, RetryLater, StoreError
from gateway.core.protocols import DeliveryResult
from gateway.core.status import Status
from gateway.store.fhir import SqliteFhirRepository


class FhirRepositoryDestination:
    """Implements ``gateway.core.protocols.Destination``."""

    CONFIG_SCHEMA: Mapping[str, Any] = {
        "type": "object",
        "required": ["path"],
        "properties": {"path": {"type": "string", "minLength": 1}},
    }

    def __init__(self, name: str, settings: Mapping[str, Any]) -> None:
        self.name = name
        self.repository = SqliteFhirRepository(Path(settings["path"]))
        self._opened = False

    async def send(self, envelope: Envelope, payload: bytes) -> DeliveryResult:
        if "fhir" not in envelope.content_type and not payload.lstrip().startswith(b"{"):
            raise PermanentDeliveryError("the repository takes FHIR JSON; add a fhir_mapping step")
        try:
            bundle = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise PermanentDeliveryError("the payload is not JSON") from exc
        if not self._opened:
            await self.repository.open()
            self._opened = True
        try:
            response = await self.repository.transaction(bundle)
        except HttpError as exc:  # the Bundle itself is at fault: no retry will change it
            raise PermanentDeliveryError(f"repository refused the transaction: {exc.message}") from exc
        except StoreError as exc:
            raise RetryLater(f"repository unavailable: {exc.message}") from exc
        return DeliveryResult(Status.SENT, "transaction applied", orjson.dumps(response), FHIR_JSON)

    async def aclose(self) -> None:
        if self._opened:
            await self.repository.close()
            self._opened = False
