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
from gateway.core.errors import MessageError, RetryLater
from gateway.core.protocols import DeliveryResult
from gateway.core.status import Status
from gateway.hl7.ack import parse_ack
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
        },
    }

    def __init__(self, name: str, settings: Mapping[str, Any]) -> None:
        self.name = name
        self.ack_timeout = float(settings.get("ack_timeout_s", 30))
        self.client = MllpClient(
            settings["host"],
            int(settings["port"]),
            connect_timeout=float(settings.get("connect_timeout_s", 10)),
        )
        # One message in flight per connection: MLLP answers in order, and lanes send concurrently.
        self._lock = asyncio.Lock()

    async def send(self, envelope: Envelope, payload: bytes) -> DeliveryResult:
        async with self._lock:
            try:
                answer = await self.client.send(payload, timeout=self.ack_timeout)
            except TimeoutError as exc:
                await self.client.close()  # the stream is out of step now
                raise RetryLater("no ACK before the timeout") from exc
            except (OSError, ConnectionError) as exc:
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


def _control_id(payload: bytes, envelope: Envelope) -> str:
    # Steps may have rewritten MSH-10: the ACK must echo what was actually sent.
    try:
        return Message.decode(payload, default_charset=envelope.charset or "ASCII").control_id
    except MessageError:
        return envelope.control_id
