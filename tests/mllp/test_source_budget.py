"""The MLLP source bounds the bytes it holds for frames not yet answered, across connections."""

from __future__ import annotations

import asyncio

from connectors.mllp.framing import frame
from connectors.mllp.source import MllpSource
from gateway.core.errors import MessageError
from gateway.core.protocols import Peer, Reply

FRAME = 20_000  # bytes per message
BUDGET = 100_000  # max_buffered_bytes for the source


class HeldIntake:
    """Answers nothing until released: frames pile up in the source as in a stalled journal."""

    def __init__(self) -> None:
        self.waiting: list[Reply] = []
        self.submitted = 0

    def submit(self, raw: bytes, peer: Peer, reply: Reply) -> None:
        self.submitted += 1
        self.waiting.append(reply)

    async def receive(self, raw: bytes, peer: Peer) -> bytes:
        raise NotImplementedError

    def reject(self, raw_prefix: bytes, error: MessageError, peer: Peer, reply: Reply) -> None:
        reply(b"MSA|AR")

    def release(self) -> None:
        replies, self.waiting = self.waiting, []
        for reply in replies:
            reply(b"MSA|AA")


async def _send_all(port: int, count: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b"MSH|^~\\&|A|B|C|D|20261123||ADT^A01|1|P|2.5\r" + b"X" * FRAME
    writer.write(frame(body) * count)
    return reader, writer


async def test_reading_pauses_at_the_byte_budget_and_resumes_when_answered() -> None:
    intake = HeldIntake()
    source = MllpSource(
        "budget",
        {"host": "127.0.0.1", "port": 0, "max_frame_bytes": 64_000, "max_buffered_bytes": BUDGET},
        intake,
    )
    await source.start()
    try:
        peers = [await _send_all(source.bound_port, 30) for _ in range(3)]
        for _ in range(200):  # until every connection has stopped reading
            await asyncio.sleep(0.01)
            if len(source.connections) == 3 and all(c.paused for c in source.connections):
                break
        assert all(c.paused for c in source.connections)
        held = source.buffered_bytes
        # At most one read chunk per connection beyond the budget, far from the 90 frames sent.
        assert BUDGET <= held < BUDGET + 3 * 2 * 64_000
        assert len(intake.waiting) < 90
        deadline = asyncio.get_running_loop().time() + 10
        while intake.submitted < 90 or intake.waiting:  # answering lets reading resume
            assert asyncio.get_running_loop().time() < deadline, intake.submitted
            intake.release()
            await asyncio.sleep(0.005)
        for reader, writer in peers:
            acks = b""
            while acks.count(b"\x1c\r") < 30:
                acks += await asyncio.wait_for(reader.read(65536), 5)
            assert acks.count(b"MSA|AA") == 30
            writer.close()
        assert source.buffered_bytes == 0
    finally:
        await source.stop(1.0)
