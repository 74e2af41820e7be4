"""A message waiting for a retry holds up its own patient's later messages, never another
patient's that shares its lane."""

from __future__ import annotations

from typing import Any

from gateway.core.envelope import Envelope
from gateway.core.protocols import DeliveryResult
from tests.conftest import FakeDestination, wait_for
from tests.messages import adt


async def test_a_retry_wait_steps_aside_for_other_patients_and_keeps_its_own_in_order(
    start_gateway: Any, client_for: Any
) -> None:
    far = {"name": "far", "type": "fake", "retry": {"max_attempts": 3, "initial_backoff_s": 1.5}}
    gw = await start_gateway(partitions=1, destinations=[far])  # one lane: every patient shares it
    fake = FakeDestination.instances["far"]
    send = fake.send
    failed: list[str] = []

    async def first_try_of_a1_fails(envelope: Envelope, payload: bytes) -> DeliveryResult:
        if envelope.control_id == "A1" and not failed:
            failed.append(envelope.control_id)
            raise ConnectionError("far end unreachable")
        return await send(envelope, payload)

    fake.send = first_try_of_a1_fails  # type: ignore[method-assign]
    client = client_for(gw)
    for control_id, patient in [("A1", "100001"), ("B1", "200002"), ("A2", "100001"), ("B2", "200002")]:
        assert b"MSA|AA|" in await client.send(adt(control_id, patient=patient))

    await wait_for(lambda: len(fake.received) == 4, timeout=10)
    delivered = [env.control_id for env, _ in fake.received]
    # B's messages went by while A1 waited its 1.5 s; A2 waited for A1.
    assert failed == ["A1"]
    assert delivered[:2] == ["B1", "B2"] and delivered[2:] == ["A1", "A2"]
    await gw.store.flush()
    rows = await gw.store.list_messages(
        status=None, control_id=None, channel="adt", limit=10, before_seq=None
    )
    assert {r["control_id"]: r["status"] for r in rows} == dict.fromkeys(("A1", "A2", "B1", "B2"), "SENT")
