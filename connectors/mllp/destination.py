"""MLLP destination: forwards to a remote HL7v2 receiver and checks its ACK.

AA/CA → SENT. AE/AR/CE/CR, a wrong MSA-2, a timeout or a lost connection →
ERROR worth retrying (the engine applies the destination's retry policy and
sends it DEAD after the last attempt). The remote ACK is kept as a stage payload.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from connectors.mllp.client import MllpClient
from gateway.core.envelope import Envelope
from gateway.core.errors import EncodingError, MessageError, PermanentDeliveryError, RetryLater
from gateway.core.protocols import DeliveryResult
from gateway.core.status import Status
from gateway.core.tls import client_context
from gateway.hl7.ack import parse_ack
from gateway.hl7.charsets import CHARSETS
from gateway.hl7.er7 import Message


class MllpDestination:
    """Implements ``gateway.core.protocols.Destination``."""

    CONFIG_SCHEMA: Mapping[str, Any] = {
        "type": "object",
        "required": ["host", "port"],
        "properties": {
            "host": {"type": "string"},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "ack_timeout_s": {"type": "number", "exclusiveMinimum": 0},
            "connect_timeout_s": {"type": "number", "exclusiveMinimum": 0},
            # MSH-18 of what is sent: messages are re-encoded into it (default: as the step built them).
            "charset": {"enum": sorted(CHARSETS)},
            "tls": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "ca": {"type": "string"},
                    "cert": {"type": "string"},
                    "key": {"type": "string"},
                    "check_hostname": {"type": "boolean"},
                },
            },
        },
    }

    def __init__(self, name: str, settings: Mapping[str, Any]) -> None:
        self.name = name
        self.ack_timeout = float(settings.get("ack_timeout_s", 30))
        self.client = MllpClient(
            settings["host"],
            int(settings["port"]),
            connect_timeout=float(settings.get("connect_timeout_s", 10)),
            ssl=client_context(settings["tls"], where=f"destinations.{name}.tls")
            if "tls" in settings
            else None,
        )
        self.charset: str | None = settings.get("charset")
        # One message in flight per connection: MLLP answers in order, and lanes send concurrently.
        self._lock = asyncio.Lock()

    async def send(self, envelope: Envelope, payload: bytes) -> DeliveryResult:
        """Each message of the payload in turn (a FHIR request may make several), each ACK checked.

        A resend after a partial failure repeats the earlier ones with the same MSH-10.
        """
        messages = _split(payload)
        answers: list[bytes] = []
        result = DeliveryResult(Status.ERROR, "empty payload", retry=False)
        for raw in messages:
            if self.charset is not None:
                raw = _recode(raw, envelope, self.charset)
            result = await self._send_one(envelope, raw)
            answers.append(result.response or b"")
            if result.status is not Status.SENT:
                break
        if len(messages) > 1:
            result = DeliveryResult(result.status, result.detail, b"".join(answers), retry=result.retry)
        return result

    async def _send_one(self, envelope: Envelope, payload: bytes) -> DeliveryResult:
        async with self._lock:
            try:
                answer = await self.client.send(payload, timeout=self.ack_timeout)
            except TimeoutError as exc:
                await self.client.close()  # the stream is out of step now
                raise RetryLater("no ACK before the timeout") from exc
            except (OSError, ConnectionError) as exc:  # a refused TLS handshake (SSLError) included
                await self.client.close()
                raise RetryLater(f"connection failed: {type(exc).__name__}") from exc
            except MessageError as exc:
                await self.client.close()
                raise RetryLater(f"unreadable answer: {exc.message}") from exc
        try:
            code, echoed, err_code = parse_ack(answer)
        except MessageError as exc:
            return DeliveryResult(Status.ERROR, f"unreadable ACK: {exc.message}", answer)
        if echoed != _control_id(payload, envelope):
            await self.client.close()
            return DeliveryResult(Status.ERROR, "ACK MSA-2 does not echo MSH-10", answer)
        if code in ("AA", "CA"):
            return DeliveryResult(Status.SENT, code, answer)
        detail = f"{code} {err_code}".strip()
        return DeliveryResult(Status.ERROR, detail or "no MSA-1", answer)

    async def aclose(self) -> None:
        await self.client.close()


def _split(payload: bytes) -> list[bytes]:
    """The messages of a payload: each starts with MSH after a segment end (one, nearly always)."""
    starts = [0]
    at = payload.find(b"\rMSH")
    while at >= 0:
        starts.append(at + 1)
        at = payload.find(b"\rMSH", at + 1)
    return [payload[a:b] for a, b in zip(starts, [*starts[1:], len(payload)], strict=True) if payload[a:b]]


def _recode(raw: bytes, envelope: Envelope, charset: str) -> bytes:
    try:
        msg = Message.decode(raw, default_charset=envelope.charset or "ASCII")
        return raw if msg.charset == charset else msg.encode(charset)
    except EncodingError as exc:
        # A character the receiver's charset has no code for: no retry will change that.
        raise PermanentDeliveryError(f"cannot send in {charset}: {exc.message}") from exc
    except MessageError:
        return raw  # not readable as HL7: sent as it is, the receiver answers for it


def _control_id(payload: bytes, envelope: Envelope) -> str:
    # Steps may have rewritten MSH-10: the ACK must echo what was actually sent.
    try:
        return Message.decode(payload, default_charset=envelope.charset or "ASCII").control_id
    except MessageError:
        return envelope.control_id
