"""FHIR intake: resources and Bundles POSTed to /fhir that a channel routes, journaled before the answer.

The contract is the MLLP one: the HTTP answer leaves only after the journal has committed the
request (one envelope per matching channel, content type FHIR_JSON). A channel decides, by its
``fhir`` rules, which requests it takes (resource type, profile, sender = the authenticated
caller) and whether they are also stored in the built-in repository. Its steps (the reverse
mapping) and destinations (MLLP) then run with the same durability, retries, DEAD and trace as
the inbound direction.

A resend is recognised by its ``X-Request-Id`` header, or else by ``Bundle.identifier``: it is
answered again and not processed twice.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from gateway.core.envelope import FHIR_JSON, Envelope
from gateway.core.errors import DeliveryError, MessageError, PasserelleError, ProcessingError, Unprocessable
from gateway.core.ids import new_id
from gateway.core.logging import get_logger
from gateway.core.protocols import AppendResult, MessageStore, StageRecord, WorkItem
from gateway.core.status import Status
from gateway.engine.intake import IntakeChannel
from gateway.store.fhir_common import FhirRepository

log = get_logger("passerelle.fhir_intake")


@dataclass(frozen=True, slots=True)
class FhirRoute:
    """A channel's ``fhir`` rules; an empty set means any."""

    resource_types: frozenset[str] = frozenset()
    profiles: frozenset[str] = frozenset()
    senders: frozenset[str] = frozenset()
    store: bool = True  # also write the request to the built-in repository

    @classmethod
    def from_config(cls, data: Mapping[str, Any] | None) -> FhirRoute:
        data = data or {}
        return cls(
            frozenset(data.get("resource_types", ())),
            frozenset(data.get("profiles", ())),
            frozenset(data.get("senders", ())),
            bool(data.get("store", True)),
        )

    def matches(self, types: set[str], profiles: set[str], sender: str | None) -> bool:
        if self.resource_types and not self.resource_types & types:
            return False
        if self.profiles and not self.profiles & profiles:
            return False
        return not (self.senders and sender not in self.senders)


@dataclass(slots=True)
class Receipt:
    """What the journal said of one request, and what the answer must wait for."""

    routes: list[tuple[IntakeChannel, FhirRoute]]
    envelopes: list[Envelope]
    results: list[AppendResult]
    store: bool

    @property
    def duplicate_of(self) -> str | None:
        """The first message's id, when every channel had already received this request."""
        if self.results and all(r.duplicate for r in self.results):
            return self.results[0].message_id
        return None

    @property
    def message_ids(self) -> list[str]:
        return [r.message_id for r in self.results]

    @property
    def waits(self) -> bool:
        return any(c.ack_timing.waits for c, _ in self.routes)


@dataclass(slots=True)
class FhirIntake:
    """The channels fed by FHIR sources (``type: fhir``), with their routing rules."""

    store: MessageStore
    routes: list[tuple[str, IntakeChannel, FhirRoute]] = field(default_factory=list)  # (source, …)
    partition_secret: bytes = b""
    received: int = 0

    def add(self, source: str, channel: IntakeChannel, route: FhirRoute) -> None:
        self.routes.append((source, channel, route))

    def routes_for(
        self, data: Mapping[str, Any], sender: str | None
    ) -> list[tuple[str, IntakeChannel, FhirRoute]]:
        resources = _resources(data)
        types = {str(r.get("resourceType")) for r in resources}
        profiles = {str(p) for r in resources for p in (r.get("meta") or {}).get("profile") or []}
        return [(s, c, r) for s, c, r in self.routes if r.matches(types, profiles, sender)]

    async def journal(
        self,
        data: Mapping[str, Any],
        raw: bytes,
        routes: Sequence[tuple[str, IntakeChannel, FhirRoute]],
        *,
        method: str,
        sender: str | None,
        request_id: str | None,
        peer: str,
    ) -> Receipt:
        """Commit one envelope per routed channel; returns once the journal holds them (StoreError else)."""
        now = time.time()
        rtype = str(data.get("resourceType", ""))
        kind = f"{rtype}^{data.get('type')}" if rtype == "Bundle" else rtype
        control_id = request_id or _bundle_identifier(data)
        partition = self._partition(data, sender)
        envelopes = []
        for source, channel, _ in routes:
            mid = new_id(now)
            envelopes.append(
                Envelope(
                    id=mid,
                    channel=channel.name,
                    source=source,
                    raw=raw,
                    content_type=FHIR_JSON,
                    sender=sender or "",
                    control_id=control_id,
                    message_type=f"{method} {kind}",
                    partition_key=partition,
                    received_at=now,
                    trace_id=mid,
                    charset="UNICODE UTF-8",
                    peer=peer,
                    dedupe=channel.dedupe,
                )
            )
        results = await self.store.append(envelopes)
        for (_, channel, _), env, res in zip(routes, envelopes, results, strict=True):
            channel.counters["duplicates" if res.duplicate else "received"] += 1
            log.info(
                "message_duplicate" if res.duplicate else "message_received",
                channel=channel.name,
                message_id=res.message_id,
                type=env.message_type,
                peer=peer,
            )
        self.received += 1
        return Receipt(
            [(c, r) for _, c, r in routes],
            envelopes,
            results,
            store=any(r.store for _, _, r in routes),
        )

    async def hand_over(self, receipt: Receipt) -> MessageError | None:
        """Give each new message to its channel; for channels answering after processing, wait.

        Returns the first failure of a waited-for channel (its message is then released for a resend).
        """
        waits = []
        for (channel, _), env, res in zip(receipt.routes, receipt.envelopes, receipt.results, strict=True):
            if res.duplicate:
                continue
            if channel.ack_timing.waits:
                waits.append((res.message_id, channel.expect_outcome(res.message_id, env.partition_key)))
            channel.offer(WorkItem(res.seq, env, Status.RECEIVED, None, (), {}, checked=True))
        failure: MessageError | None = None
        for mid, fut in waits:
            outcome = await fut
            if outcome.error is not None or outcome.status in (Status.ERROR, Status.DEAD):
                failure = failure or outcome.error or ProcessingError("processing failed")
                await self.store.release_dedupe(mid)
        return failure

    def narrow(self, receipt: Receipt, data: Mapping[str, Any], refused: Sequence[int]) -> Mapping[str, Any]:
        """A batch whose entries the repository partly refused: the channels get only the accepted
        ones (the refused ones were answered in the batch-response). Recorded on each message."""
        entries = list(data.get("entry") or [])
        kept = {**data, "entry": [e for i, e in enumerate(entries) if i not in set(refused)]}
        raw = orjson.dumps(kept)
        for n, (env, res) in enumerate(zip(receipt.envelopes, receipt.results, strict=True)):
            if res.duplicate:
                continue
            receipt.envelopes[n] = replace(env, raw=raw)
            self.store.record(
                res.message_id,
                StageRecord("intake", Status.RECEIVED, raw, FHIR_JSON, {"not_routed": list(refused)}),
            )
        return kept

    async def abandon(self, receipt: Receipt, error: Exception) -> None:
        """The request was refused after it was journaled (the repository said no): not routed,
        kept with its error, and a corrected resend is processed afresh."""
        text = getattr(error, "message", type(error).__name__)
        for res in receipt.results:
            if res.duplicate:
                continue
            await self.store.record(
                res.message_id,
                StageRecord("intake", Status.ERROR, detail={"error": type(error).__name__, "text": text}),
                status=Status.ERROR,
            )
            await self.store.release_dedupe(res.message_id)

    def _partition(self, data: Mapping[str, Any], sender: str | None) -> str:
        """A keyed digest of the patient: one patient's requests keep their order, no identifier stored."""
        key = _patient_key(data)
        if not key:
            return f"sender:{sender or ''}"
        return hashlib.blake2b(key.encode(), digest_size=10, key=self.partition_secret).hexdigest()


# HL7 error codes of a refusal of the content itself (a mapping that cannot read it, content no
# rule reads under ``unmapped: reject``): the sender must change the request, a resend cannot help.
_CONTENT_CODES = frozenset({"100", "101", "102", "103", "200", "201", "202", "203"})


def delivery_failed(error: MessageError) -> PasserelleError:
    """The answer when a channel that answers after processing failed: 422 when its steps refused
    the content, else 502 (not delivered)."""
    if error.hl7_error_code in _CONTENT_CODES:
        return Unprocessable(f"not processed: {error.message}", location=error.location)
    return DeliveryError(f"not delivered: {error.message}", location=error.location)


def _resources(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    if data.get("resourceType") != "Bundle":
        return [data]
    return [
        e["resource"]
        for e in data.get("entry") or []
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]


def _bundle_identifier(data: Mapping[str, Any]) -> str:
    ident = data.get("identifier") if data.get("resourceType") == "Bundle" else None
    if isinstance(ident, dict) and ident.get("value"):
        return f"{ident.get('system', '')}|{ident['value']}"
    return ""


def _patient_key(data: Mapping[str, Any]) -> str:
    resources = _resources(data)
    for r in resources:
        if r.get("resourceType") == "Patient":
            for ident in r.get("identifier") or []:
                if isinstance(ident, dict) and ident.get("value"):
                    return f"{ident.get('system', '')}|{ident['value']}"
    for r in resources:
        for name in ("subject", "patient"):
            ref = r.get(name)
            if isinstance(ref, dict):
                if ref.get("reference"):
                    return str(ref["reference"])
                ident = ref.get("identifier")
                if isinstance(ident, dict) and ident.get("value"):
                    return f"{ident.get('system', '')}|{ident['value']}"
    return ""


class FhirSource:
    """``type: fhir``: a source whose requests arrive on the HTTP server's /fhir routes.

    It opens no socket of its own; it names the channels that FHIR requests may be routed to.
    """

    CONFIG_SCHEMA: Mapping[str, Any] = {"type": "object", "properties": {}}

    def __init__(self, name: str, settings: Mapping[str, Any], intake: FhirIntake) -> None:
        self.name = name
        self.intake = intake

    async def start(self) -> None:
        log.info("fhir_source_ready", source=self.name, channels=len(self.intake.routes))

    async def stop(self, drain_timeout: float) -> None:
        return None


def attach_repository(steps: Iterable[object], repository: FhirRepository) -> bool:
    """Give the runtime's FHIR repository to the steps that read from it (the reverse mapping looks
    up the Patient a request names by id only). True when a step took it."""
    taken = False
    for step in steps:
        if hasattr(step, "repository") and callable(getattr(step, "prepare", None)):
            step.repository = repository
            taken = True
    return taken
