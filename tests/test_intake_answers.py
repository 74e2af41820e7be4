"""What the intake answers, and keeps, for headers and control ids senders get wrong.

- MSH-15 of spaces or outside table 0155 is still answered (defect 8);
- an MSH-10 reused for another message is answered AE 205 and the message kept (defect 9);
- refusals are found by the control id they carried, with their error (defect 11).
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from connectors.mllp.framing import frame
from gateway.core.status import Status
from gateway.hl7.er7 import Message
from tests.conftest import AUTH, FakeDestination, mllp_port, wait_for
from tests.messages import adt


def ack_fields(raw: bytes) -> Message:
    return Message.decode(raw, default_charset="UNICODE UTF-8")


async def rows_for(gw, control_id: str, expected: int) -> list[dict]:  # type: ignore[no-untyped-def, type-arg]
    for _ in range(300):
        await gw.store.flush()
        rows = await gw.store.list_messages(
            status=None, control_id=control_id, channel=None, limit=20, before_seq=None
        )
        if len(rows) >= expected:
            return rows  # type: ignore[no-any-return]
        await asyncio.sleep(0.01)
    raise AssertionError(f"{expected} messages with MSH-10 {control_id} never appeared")


# -- defect 8: MSH-15 ------------------------------------------------------------------------


def v23_with_msh15(control_id: str, msh15: str) -> bytes:
    """A v2.3 header that ends at MSH-15, as a real sender wrote it (a trailing space)."""
    head = (
        f"MSH|^~\\&|DXCARE|HOPITAL-NORD|PASSERELLE|GHT|20261123101500||ADT^A01|{control_id}|P|2.3|||{msh15}"
    )
    body = adt(control_id).split(b"\r", 1)[1]
    return head.encode() + b"\r" + body


@pytest.mark.parametrize(
    ("msh15", "answer", "warning"),
    [
        (" ", "AA", "MSH-15 holds only spaces: read as empty"),
        ("XX", "CA", "MSH-15 'XX' is not a value of HL7 table 0155 (AL, NE, ER, SU): answered as AL"),
    ],
    ids=["space", "unknown"],
)
async def test_an_msh15_outside_table_0155_is_answered_and_so_is_its_resend(
    start_gateway, client_for, msh15: str, answer: str, warning: str
) -> None:
    gw = await start_gateway()
    client = client_for(gw)
    raw = v23_with_msh15("S15", msh15)
    ack = ack_fields(await client.send(raw, timeout=5))
    assert (ack.get("MSA-1"), ack.get("MSA-2")) == (answer, "S15")
    # the sender did not hear in time and sends it again: a duplicate, answered too
    again = ack_fields(await client.send(raw, timeout=5))
    assert (again.get("MSA-1"), again.get("MSA-2")) == (answer, "S15")
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 1)
    (row,) = await rows_for(gw, "S15", 1)
    trace = await gw.store.get_message(row["id"], with_payloads=False)
    warnings = [w for s in trace["stages"] for w in s["detail"].get("warnings", [])]
    assert warnings == [warning]
    # the next frame on the connection is answered in turn: nothing was left unanswered
    assert ack_fields(await client.send(adt("S15-NEXT"), timeout=5)).get("MSA-2") == "S15-NEXT"


async def test_only_ne_er_and_su_leave_a_message_unanswered(start_gateway) -> None:
    gw = await start_gateway()
    reader, writer = await asyncio.open_connection("127.0.0.1", mllp_port(gw))
    # NE and ER on success: no answer; SU on success and AL: answered. The answers come in order.
    frames = [
        adt("Q1", accept_ack="NE"),
        adt("Q2", accept_ack="ER"),
        adt("Q3", accept_ack="SU"),
        adt("Q4", accept_ack="AL"),
        adt("Q5", accept_ack="xx"),
        adt("Q6", accept_ack="  "),
    ]
    writer.write(b"".join(frame(f) for f in frames))
    await writer.drain()
    answers = []
    while len(answers) < 4:
        data = await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 5)
        answers.append(ack_fields(data.strip(b"\x0b\x1c\r")))
    assert [(a.get("MSA-1"), a.get("MSA-2")) for a in answers] == [
        ("CA", "Q3"),
        ("CA", "Q4"),
        ("CA", "Q5"),
        ("AA", "Q6"),
    ]
    writer.close()


# -- defect 9: an MSH-10 reused for another message -------------------------------------------


async def test_another_message_under_a_seen_control_id_is_refused_and_kept(start_gateway, client_for) -> None:
    gw = await start_gateway()
    client = client_for(gw)
    first = adt("RU1", patient="700011")
    other = adt("RU1", patient="700012")
    assert ack_fields(await client.send(first)).get("MSA-1") == "AA"
    nack = ack_fields(await client.send(other))
    assert (nack.get("MSA-1"), nack.get("MSA-2")) == ("AE", "RU1")
    assert nack.get("ERR-3.1") == "205"
    assert nack.get("ERR-3.3") == "HL70357"
    assert nack.get_raw("ERR-2") == "MSH^1^10^1"
    assert nack.get("ERR-4") == "E"
    # the same message again is still a duplicate: answered AA, processed once
    assert ack_fields(await client.send(first)).get("MSA-1") == "AA"
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 1)
    await asyncio.sleep(0.05)
    assert [payload for _, payload in far.received] == [first]
    rows = await rows_for(gw, "RU1", 2)
    assert len(rows) == 2
    kept = next(r for r in rows if r["status"] == Status.ERROR.value)
    assert kept["error"] == "205"
    stored = await gw.store.get_message(kept["id"], with_payloads=True)
    assert stored["raw"] == other  # its bytes are kept, never dropped
    stages = {s["stage"]: s for s in stored["stages"]}
    assert stages["intake"]["detail"]["error"] == "205"
    assert stages["intake"]["detail"]["location"] == "MSH-10"
    assert stages["ack"]["detail"] == {"code": "AE"}
    assert stages["ack"]["payload"].split(b"\r")[1].startswith(b"MSA|AE|RU1|")
    # the sender corrects it: a new control id gets through
    assert ack_fields(await client.send(adt("RU2", patient="700012"))).get("MSA-1") == "AA"
    await wait_for(lambda: len(far.received) == 2)


async def test_a_reused_control_id_is_answered_ae_when_the_channel_answers_after_delivery(
    start_gateway, client_for
) -> None:
    gw = await start_gateway(queue=False, ack={"timing": "after_delivery"})
    client = client_for(gw)
    assert ack_fields(await client.send(adt("RU3", patient="700011"))).get("MSA-1") == "AA"
    nack = ack_fields(await client.send(adt("RU3", patient="700012")))
    assert (nack.get("MSA-1"), nack.get("ERR-3.1"), nack.get_raw("ERR-2")) == ("AE", "205", "MSH^1^10^1")
    assert len(FakeDestination.instances["far"].received) == 1
    rows = await rows_for(gw, "RU3", 2)
    assert sorted(r["status"] for r in rows) == ["ERROR", "SENT"]


async def test_enhanced_mode_answers_a_reused_control_id_ce(start_gateway, client_for) -> None:
    gw = await start_gateway()
    client = client_for(gw)
    assert ack_fields(await client.send(adt("RU4", accept_ack="AL"))).get("MSA-1") == "CA"
    nack = ack_fields(await client.send(adt("RU4", patient="700012", accept_ack="ER")))
    assert (nack.get("MSA-1"), nack.get("ERR-3.1")) == ("CE", "205")


# -- defect 11: refusals are found by their control id ------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        adt("NC0007", charset="8859/15").replace(b"8859/15", b"KLINGON"),
        adt("NC0007").replace("Françoise".encode(), b"Fran\xe7oise"),
        adt("NC0007").replace(b"^~\\&", "^\u02dc\\&".encode()),
    ],
    ids=["unknown-charset", "undecodable", "unusable-separators"],
)
async def test_a_refusal_is_listed_by_its_control_id_with_its_error(
    start_gateway, client_for, raw: bytes
) -> None:
    gw = await start_gateway()
    client = client_for(gw)
    nack = ack_fields(await client.send(raw))
    assert (nack.get("MSA-1"), nack.get("MSA-2")) == ("AR", "NC0007")
    (row,) = await rows_for(gw, "NC0007", 1)
    assert row["control_id"] == "NC0007"
    assert row["status"] == Status.ERROR.value
    assert row["error"] == "102"
    assert row["channel"] == "source:hospital"
    # nothing to replay (no channel took it): the answer says so, and what the sender should do
    async with aiohttp.ClientSession(headers=AUTH) as http:
        url = f"http://127.0.0.1:{gw.http_port_bound}/api/messages/{row['id']}/replay"
        async with http.post(url) as resp:
            assert resp.status == 409
            outcome = await resp.json()
    assert "refused at intake" in outcome["issue"][0]["diagnostics"]
    # refusals are never deduplicated: the corrected resend, same MSH-10, is accepted and delivered
    assert ack_fields(await client.send(adt("NC0007"))).get("MSA-1") == "AA"
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 1)
    rows = await rows_for(gw, "NC0007", 2)
    assert sorted(r["channel"] for r in rows) == ["adt", "source:hospital"]
