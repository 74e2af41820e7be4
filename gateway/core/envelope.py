"""The envelope: one immutable record per received message and channel."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.status import Status

# The content types payloads are stored and exchanged with.
HL7_V2 = "application/hl7-v2"
FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True, slots=True)
class Envelope:
    id: str
    channel: str
    source: str
    raw: bytes
    content_type: str  # HL7_V2 or FHIR_JSON
    sender: str  # MSH-3^MSH-4 (application^facility)
    control_id: str  # MSH-10
    message_type: str  # e.g. "ADT^A01"
    partition_key: str  # a digest of the patient (PID-3 first repetition), used for ordering
    received_at: float
    trace_id: str
    charset: str = ""
    peer: str = ""
    # Status decided at intake: RECEIVED, or FILTERED when the channel filter declined it.
    status: Status = Status.RECEIVED
    dedupe: bool = True  # the channel detects resends of the same sender + MSH-10

    @property
    def dedupe_key(self) -> str:
        return f"{self.channel}\x1f{self.sender}\x1f{self.control_id}"
