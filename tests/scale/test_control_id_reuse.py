"""An MSH-10 reused for another message (defect 9), on the embedded backend and on NATS JetStream
+ PostgreSQL: answered AE 205 and kept, never acknowledged and thrown away."""

from __future__ import annotations

import asyncio

import pytest

from gateway.hl7.er7 import Message
from tests.conftest import FakeDestination, wait_for
from tests.messages import adt
from tests.scale.conftest import ConfigFor

pytestmark = pytest.mark.live


def ack_of(raw: bytes) -> Message:
    return Message.decode(raw, default_charset="UNICODE UTF-8")


async def rows_for(gw, control_id: str, expected: int) -> list[dict]:  # type: ignore[no-untyped-def, type-arg]
    for _ in range(500):
        rows = await gw.store.list_messages(
            status=None, control_id=control_id, channel=None, limit=20, before_seq=None
        )
        if len(rows) >= expected:
            return rows  # type: ignore[no-any-return]
        await asyncio.sleep(0.02)
    raise AssertionError(f"{expected} messages with MSH-10 {control_id} never appeared")


async def test_a_reused_control_id_is_answered_ae_205_and_kept(
    backend_config: ConfigFor, start_gateway, client_for
) -> None:
    gw = await start_gateway(backend_config())
    client = client_for(gw)
    first, other = adt("RB1", patient="700011"), adt("RB1", patient="700012")
    assert ack_of(await client.send(first)).get("MSA-1") == "AA"
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 1)
    nack = ack_of(await client.send(other))
    assert (nack.get("MSA-1"), nack.get("MSA-2"), nack.get("ERR-3.1")) == ("AE", "RB1", "205")
    assert nack.get_raw("ERR-2") == "MSH^1^10^1"
    # a true resend is still a duplicate
    assert ack_of(await client.send(first)).get("MSA-1") == "AA"
    rows = await rows_for(gw, "RB1", 2)
    assert sorted(r["status"] for r in rows) == ["ERROR", "SENT"]
    kept = next(r for r in rows if r["status"] == "ERROR")
    assert kept["error"] == "205"
    stored = await gw.store.get_message(kept["id"], with_payloads=True)
    assert stored is not None and stored["raw"] == other
    await asyncio.sleep(0.1)
    assert [payload for _, payload in far.received] == [first]


async def test_two_messages_under_one_control_id_at_once_deliver_one_and_keep_the_other(
    backend_config: ConfigFor, start_gateway, client_for
) -> None:
    """Sent back to back: on JetStream the second may be published before the first reaches
    PostgreSQL (its sender then heard AA); either way one is delivered, the other kept as ERROR."""
    gw = await start_gateway(backend_config())
    a, b = client_for(gw), client_for(gw)
    one, two = adt("RB2", patient="700011"), adt("RB2", patient="700012")
    answers = await asyncio.gather(a.send(one), b.send(two))
    codes = sorted(ack_of(x).get("MSA-1") for x in answers)
    assert codes in (["AA", "AE"], ["AA", "AA"])
    if backend_config.backend == "sqlite":  # type: ignore[attr-defined]
        assert codes == ["AA", "AE"]
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 1)
    rows = await rows_for(gw, "RB2", 2)
    for _ in range(200):
        rows = await rows_for(gw, "RB2", 2)
        if sorted(r["status"] for r in rows) == ["ERROR", "SENT"]:
            break
        await asyncio.sleep(0.02)
    assert sorted(r["status"] for r in rows) == ["ERROR", "SENT"]
    kept = next(r for r in rows if r["status"] == "ERROR")
    stored = await gw.store.get_message(kept["id"], with_payloads=True)
    assert stored is not None and {stored["raw"], far.received[0][1]} == {one, two}
