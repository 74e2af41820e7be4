"""HL7v2 intake for one source: read the header, journal, then acknowledge.

The order is the contract: the ACK (AA/CA) is built only after the journal has
committed the envelope. A message we cannot read is still journaled (status
ERROR, with its error and whatever MSH-10 could be read) before it is answered
AR: bad input loses nothing. A message that reuses an MSH-10 already journaled
for other content is kept too (ERROR) and answered AE, ERR-3 205 at MSH-10.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol

from gateway.core.ack import AckTiming
from gateway.core.envelope import HL7_V2, Envelope
from gateway.core.errors import (
    AckCode,
    EncodingError,
    MessageError,
    MissingField,
    ProcessingError,
    SenderNotAllowed,
    StoreError,
    ValidationError,
)
from gateway.core.ids import new_id
from gateway.core.logging import get_logger
from gateway.core.protocols import AppendResult, MessageStore, Peer, Reply, StageRecord, WorkItem
from gateway.core.status import Status
from gateway.engine.pipeline import Outcome
from gateway.hl7.ack import AckRequest, ack_request, build_ack
from gateway.hl7.er7 import Message

log = get_logger("passerelle.intake")


class ControlIdReused(ValidationError):
    """The sender already sent another message (other bytes) under this MSH-10 (table 0357: 205)."""

    hl7_error_code = "205"
    http_status = 409
    fhir_issue_code = "duplicate"


def _control_id_reused() -> ControlIdReused:
    return ControlIdReused(
        "MSH-10 was already used by this sender for another message: give this one its own control id",
        location="MSH-10",
    )


class IntakeChannel(Protocol):
    """What the intake needs of a channel: a ChannelRuntime, or its stand-in for a worker process."""

    name: str
    ack_timing: AckTiming
    sending_application: str
    dedupe: bool
    counters: dict[str, int]

    def accepts(self, msg: Message) -> bool: ...

    def screen(self, msg: Message) -> MessageError | None: ...

    def offer(self, item: WorkItem) -> None: ...

    def expect_outcome(self, message_id: str, partition: str = "") -> asyncio.Future[Outcome]: ...


class Hl7Intake:
    """Implements ``gateway.core.protocols.Intake`` for the channels fed by one source."""

    def __init__(
        self,
        source: str,
        channels: Sequence[IntakeChannel],
        store: MessageStore,
        *,
        default_charset: str = "ASCII",
        sending_application: str = "PASSERELLE",
    ) -> None:
        self.source = source
        self.channels = list(channels)
        self.store = store
        self.default_charset = default_charset
        self.sending_application = sending_application
        self.rejected = 0
        self.acked = 0
        # (channel, message type) → count; read by /metrics (the intake runs in the main process only)
        self.received_by_type: dict[tuple[str, str], int] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self.partition_secret = b""  # set by the gateway at start, from the data directory
        # Channels that acknowledge on commit take the callback path; the others wait for processing.
        self._ack_on_commit = not any(c.ack_timing.waits for c in self.channels)

    # -- the hot path: callbacks, so that a frame is journaled and answered within two loop turns --

    def submit(self, raw: bytes, peer: Peer, reply: Reply) -> None:
        now = time.time()
        try:
            msg = Message.decode(raw, default_charset=self.default_charset)
            _check_header(msg)
            if peer.channels is not None and not any(
                c.name in peer.channels and c.accepts(msg) for c in self.channels
            ):
                raise SenderNotAllowed("this sender may not send this message to this gateway")
            self._screen(msg, peer)
        except MessageError as exc:
            self._spawn(self._reject_journaled(raw, exc, peer, now), reply)
            return
        request = ack_request(msg)
        if not (request.enhanced or self._ack_on_commit):
            self._spawn(self._receive_after_processing(msg, raw, peer, now), reply)
            return
        envelopes = self._envelopes(msg, raw, peer, now)
        code = AckCode.CA if request.enhanced else AckCode.AA
        # The answer is known before the commit, so it is traced in the same write.
        early = build_ack(msg, code, sending_application=self.sending_application)
        if not request.wants_commit_ack(True):
            early = b""

        def committed(result: list[AppendResult] | BaseException) -> None:
            if isinstance(result, BaseException):
                reply(self._journal_failed(msg, request.enhanced, peer))
                return
            self._dispatch(msg, envelopes, result, peer)
            if request.warnings:
                self._note_warnings(msg, request, result, peer)
            if any(r.conflict for r in result):
                reply(self._conflict_ack(msg, request, result))
                return
            if early:
                self.acked += 1
            reply(early)

        try:
            self.store.append_then(envelopes, committed, ack=(early, code.value) if early else None)
        except StoreError:
            reply(self._journal_failed(msg, request.enhanced, peer))

    def _screen(self, msg: Message, peer: Peer) -> None:
        """A channel that takes this message may refuse it before it is acknowledged (a type it
        does not map, an identifier without namespace…): the whole message is then refused, as
        one ACK answers for every channel."""
        for channel in self.channels:
            if channel.accepts(msg) and (peer.channels is None or channel.name in peer.channels):
                error = channel.screen(msg)
                if error is not None:
                    raise error

    async def receive(self, raw: bytes, peer: Peer) -> bytes:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.submit(raw, peer, lambda ack: None if fut.done() else fut.set_result(ack))
        return await fut

    def _spawn(self, coro: Coroutine[Any, Any, bytes], reply: Reply) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)

        def finished(t: asyncio.Task[bytes]) -> None:
            self._background.discard(t)
            if t.cancelled():
                return  # shutting down: the frame is not answered, and the sender will resend
            exc = t.exception()
            if exc is None:
                reply(t.result())
            else:
                log.error("intake_failed", source=self.source, error=type(exc).__name__)
                reply(build_ack(None, AckCode.AE, ProcessingError("internal error")))

        task.add_done_callback(finished)

    def _envelopes(self, msg: Message, raw: bytes, peer: Peer, now: float) -> list[Envelope]:
        sender = f"{msg.sending_application}^{msg.sending_facility}"
        message_type = f"{msg.message_type}^{msg.trigger}"
        # Ordering needs only equality of patients: a keyed digest keeps the identifier out of the
        # message table, the API and the logs (keyed, because an IPP could be found by enumeration).
        pid = msg.get_raw("PID-3")
        partition = (
            hashlib.blake2b(pid.encode(), digest_size=10, key=self.partition_secret).hexdigest()
            if pid
            else f"sender:{sender}"
        )
        out = []
        for channel in self.channels:
            mid = new_id(now)
            out.append(
                Envelope(
                    id=mid,
                    channel=channel.name,
                    source=self.source,
                    raw=raw,
                    content_type=HL7_V2,
                    sender=sender,
                    control_id=msg.control_id,
                    message_type=message_type,
                    partition_key=partition,
                    received_at=now,
                    trace_id=mid,
                    charset=msg.charset,
                    peer=peer.address,
                    status=Status.RECEIVED
                    if channel.accepts(msg) and (peer.channels is None or channel.name in peer.channels)
                    else Status.FILTERED,
                    dedupe=channel.dedupe,
                )
            )
        return out

    def _note_warnings(
        self, msg: Message, request: AckRequest, results: Sequence[AppendResult], peer: Peer
    ) -> None:
        """MSH-15/16 values read otherwise than written: the warning is kept on the message."""
        log.warning(
            "ack_request_unusual",
            source=self.source,
            control_id=msg.control_id,
            peer=peer.address,
            fields=sorted({w[:6] for w in request.warnings}),
        )
        detail = {"warnings": list(request.warnings)}
        for res in results:
            if not res.duplicate:
                self.store.record(res.message_id, StageRecord("intake", Status.RECEIVED, detail=detail))

    def _conflict_ack(self, msg: Message, request: AckRequest, results: Sequence[AppendResult]) -> bytes:
        """The answer when a channel's journal holds this MSH-10 for other content: AE (CE), with
        ERR-3 205 at MSH-10, traced on the rows this frame made. Another message's answer is
        never sent for this one, and a resend under a new control id gets through."""
        self.rejected += 1
        code = AckCode.CE if request.enhanced else AckCode.AE
        ack = build_ack(msg, code, _control_id_reused(), sending_application=self.sending_application)
        for res in results:
            if res.conflict or not res.duplicate:
                self.store.record(
                    res.message_id, StageRecord("ack", Status.ERROR, ack, HL7_V2, {"code": code.value})
                )
        return ack if request.wants_commit_ack(False) else b""

    def _dispatch(
        self, msg: Message, envelopes: Sequence[Envelope], results: Sequence[AppendResult], peer: Peer
    ) -> list[tuple[IntakeChannel, str]]:
        """Hand new messages to their channels; returns those whose outcome the ACK must wait for."""
        waits = []
        for channel, env, res in zip(self.channels, envelopes, results, strict=True):
            if res.conflict:
                channel.counters["conflicts"] = channel.counters.get("conflicts", 0) + 1
                log.warning(
                    "message_control_id_reused",
                    channel=channel.name,
                    message_id=res.message_id,
                    control_id=msg.control_id,
                    peer=peer.address,
                    code=ControlIdReused.hl7_error_code,
                )
                continue
            if res.duplicate:
                channel.counters["duplicates"] += 1
                log.info(
                    "message_duplicate",
                    channel=channel.name,
                    message_id=res.message_id,
                    control_id=msg.control_id,
                    peer=peer.address,
                )
                continue
            channel.counters["received"] += 1
            key = (channel.name, env.message_type)
            self.received_by_type[key] = self.received_by_type.get(key, 0) + 1
            log.info(
                "message_received",
                channel=channel.name,
                message_id=res.message_id,
                control_id=msg.control_id,
                type=env.message_type,
                peer=peer.address,
                status=env.status.value,
            )
            if env.status is Status.FILTERED:
                channel.counters["filtered"] += 1
                continue
            if channel.ack_timing.waits:
                waits.append((channel, res.message_id))
            channel.offer(WorkItem(res.seq, env, Status.RECEIVED, None, (), {}, checked=True))
        return waits

    def _journal_failed(self, msg: Message, enhanced: bool, peer: Peer) -> bytes:
        log.error("journal_unavailable", source=self.source, peer=peer.address, control_id=msg.control_id)
        err = StoreError("the message could not be stored; send it again")
        return build_ack(
            msg, AckCode.CE if enhanced else AckCode.AE, err, sending_application=self.sending_application
        )

    async def _receive_after_processing(self, msg: Message, raw: bytes, peer: Peer, now: float) -> bytes:
        """Channels that acknowledge after transform or delivery: the ACK reflects the outcome."""
        envelopes = self._envelopes(msg, raw, peer, now)
        try:
            results = await self.store.append(envelopes)
        except StoreError:
            return self._journal_failed(msg, False, peer)
        waits = [(mid, fut) for fut, mid in self._dispatch_expecting(msg, envelopes, results, peer)]
        request = ack_request(msg)
        if request.warnings:
            self._note_warnings(msg, request, results, peer)
        code: AckCode = AckCode.AA
        error: MessageError | None = None
        if any(res.conflict for res in results):
            code, error = AckCode.AE, _control_id_reused()
            self.rejected += 1
        for mid, fut in waits:
            outcome = await fut
            if outcome.error is not None or outcome.status in (Status.ERROR, Status.DEAD):
                if code is AckCode.AA:
                    code = AckCode.AE
                    error = outcome.error or ProcessingError("processing failed")
                # The sender is told AE and will resend: that resend must be processed, not deduplicated,
                # so the release is committed before the answer leaves.
                await self.store.release_dedupe(mid)
        if not request.wants_commit_ack(code is AckCode.AA):
            return b""
        ack = build_ack(msg, code, error, sending_application=self.sending_application)
        self.acked += 1
        for res in results:
            if res.conflict or not res.duplicate:
                self.store.record(
                    res.message_id, StageRecord("ack", Status.RECEIVED, ack, HL7_V2, {"code": code.value})
                )
        return ack

    def _dispatch_expecting(
        self, msg: Message, envelopes: Sequence[Envelope], results: Sequence[AppendResult], peer: Peer
    ) -> list[tuple[asyncio.Future[Outcome], str]]:
        # Waiters are registered before the lanes can finish the work.
        expected = {
            res.message_id: channel.expect_outcome(res.message_id, env.partition_key)
            for channel, env, res in zip(self.channels, envelopes, results, strict=True)
            if not res.duplicate and env.status is Status.RECEIVED and channel.ack_timing.waits
        }
        self._dispatch(msg, envelopes, results, peer)
        return [(fut, mid) for mid, fut in expected.items()]

    async def _reject_journaled(self, raw: bytes, error: MessageError, peer: Peer, now: float) -> bytes:
        await self._journal_rejected(raw, error, peer, now)
        return self._reject_ack(raw, error)

    def reject(self, raw_prefix: bytes, error: MessageError, peer: Peer, reply: Reply) -> None:
        """Answer a frame refused before it could be read whole (oversize): like every refusal, its
        beginning is journaled first, then ``reply`` gets the AR."""
        self._spawn(self._reject_journaled(raw_prefix, error, peer, time.time()), reply)

    def _reject_ack(self, raw: bytes, error: MessageError) -> bytes:
        self.rejected += 1
        msg = _lenient_header(raw)
        request = ack_request(msg)
        code = AckCode.CR if request.enhanced else error.ack_code
        if code is AckCode.AE and request.enhanced:
            code = AckCode.CE
        return build_ack(msg, code, error, sending_application=self.sending_application)

    async def _journal_rejected(self, raw: bytes, error: MessageError, peer: Peer, now: float) -> None:
        msg = _lenient_header(raw)
        control_id = msg.control_id if msg is not None else ""
        mid = new_id(now)
        log.warning(
            "message_rejected",
            source=self.source,
            message_id=mid,
            control_id=control_id,
            peer=peer.address,
            code=error.hl7_error_code,
            error=type(error).__name__,
            location=error.location,
        )
        env = Envelope(
            id=mid,
            channel=f"source:{self.source}",
            source=self.source,
            raw=raw,
            content_type=HL7_V2,
            sender=f"{msg.sending_application}^{msg.sending_facility}" if msg is not None else "",
            # Kept so that a search by MSH-10 finds the refusal; never deduplicated (no dedupe key),
            # so that a corrected resend under the same MSH-10 gets through.
            control_id=control_id,
            message_type=f"{msg.message_type}^{msg.trigger}" if msg is not None else "",
            partition_key="",
            received_at=now,
            trace_id=mid,
            peer=peer.address,
            status=Status.ERROR,
            dedupe=False,
        )
        try:
            await self.store.append([env])
            self.store.record(
                mid,
                StageRecord(
                    "intake",
                    Status.ERROR,
                    detail={
                        "error": error.hl7_error_code,
                        "text": error.message,
                        "location": error.location,
                        "control_id": control_id,
                    },
                ),
                status=Status.ERROR,  # the message's error column: lists show why it was refused
            )
        except StoreError:
            log.error("journal_unavailable", source=self.source, peer=peer.address)


def _check_header(msg: Message) -> None:
    if not msg.message_type:
        raise MissingField("MSH-9 (message type) is empty", location="MSH-9")
    if not msg.control_id:
        raise MissingField("MSH-10 (message control id) is empty", location="MSH-10")


def _lenient_header(raw: bytes) -> Message | None:
    """Whatever MSH can be read, to address the answer (latin-1 maps every byte, so decoding cannot fail)."""
    text = raw.decode("latin-1")
    try:
        return Message.parse(text)
    except EncodingError:
        # An unknown MSH-18: read the header as if it declared none; the AR goes out in ASCII.
        head, sep, rest = text.partition("\r")
        fields = head.split(head[3:4]) if len(head) > 3 else []
        if len(fields) > 17:
            fields[17] = ""
        try:
            return Message.parse(head[3:4].join(fields) + sep + rest)
        except (MessageError, ValueError):
            return None
    except (MessageError, ValueError):
        return _header_only(text)


def _header_only(text: str) -> Message | None:
    """MSH alone, read with the standard encoding characters when its own are unusable (a
    typographic tilde in MSH-2): enough to address the refusal and echo MSH-10, nothing more."""
    head = text.lstrip("\ufeff\xef\xbb\xbf").split("\r", 1)[0].split("\n", 1)[0]
    if not head.startswith("MSH") or len(head) < 8:
        return None
    fs = head[3]
    fields = head.split(fs)
    if len(fields) < 3:
        return None
    fields[1] = "^~\\&"
    if len(fields) > 17:
        fields[17] = ""  # its charset name was read with the wrong separators too
    try:
        return Message.parse(fs.join(fields) + "\r")
    except (MessageError, ValueError):
        return None
