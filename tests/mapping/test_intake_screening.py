"""What a mapping channel refuses before it acknowledges: a type it does not map (AR, ERR-3 200, the
reason from mappings/unsupported.yaml), an identifier without namespace (AE, ERR-3 103, the field).
The refused bytes are journaled all the same: bad input loses nothing."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.hl7.er7 import Message
from tests.conftest import FakeDestination, make_config, wait_for, with_settings
from tests.mapping.test_adt import A01, MAPPINGS, segment
from tests.waiting import until


def mapping_step(**settings: Any) -> list[dict[str, Any]]:
    return [{"type": "fhir_mapping", "directory": str(MAPPINGS), **settings}]


def config(tmp_path: Any, workers: int, **settings: Any) -> Any:
    """With workers the channel runs in another process: a real destination, and the screening
    runs in the main process, before the ACK."""
    cfg = make_config(tmp_path, steps=mapping_step(**settings))
    if workers:
        cfg.data["channels"][0]["destinations"] = [
            {"name": "out", "type": "file", "directory": str(tmp_path / "out")}
        ]
    return with_settings(cfg, workers=workers)


ORU_WITHOUT_AUTHORITY = (
    "\r".join(
        [
            "MSH|^~\\&|SIL|LABO-EST|PASSERELLE|GHT|20261123110000||ORU^R01^ORU_R01|R-77|P|2.5",
            "PID|||552233^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^PI||GÉRARD^Zoé",
            segment("OBR", {1: "1", 3: "RES456", 4: "2823-3^Potassium^LN", 25: "F"}),
            segment("OBX", {1: "1", 2: "NM", 3: "2823-3^Potassium^LN", 5: "4.1", 11: "F"}),
        ]
    )
    + "\r"
)


@pytest.mark.parametrize("workers", [0, 1])
async def test_a_type_no_mapping_serves_is_refused_with_its_reason(
    start_gateway, client_for, tmp_path, workers
) -> None:
    gw = await start_gateway(config(tmp_path, workers))
    a44 = A01.replace("ADT^A01^ADT_A01", "ADT^A44^ADT_A43").replace("A01-0001", "A44-0001")
    ack = Message.decode(await client_for(gw).send(a44.encode()))
    assert ack.get("MSA-1") == "AR"
    assert ack.get("MSA-2") == "A44-0001"
    assert ack.get("ERR-3.1") == "200"
    assert "moving an account" in ack.get("ERR-8")
    assert ack.get("ERR-2") == "MSH^1^9^1"
    rows = await gw.store.list_messages(
        status="ERROR", control_id=None, channel=None, limit=10, before_seq=None
    )
    assert len(rows) == 1  # the refused message is kept, with its reason, never lost


async def test_unsupported_error_acknowledges_and_keeps_it_for_a_later_mapping(
    start_gateway, client_for
) -> None:
    gw = await start_gateway(steps=mapping_step(unsupported="error"))
    a44 = A01.replace("ADT^A01^ADT_A01", "ADT^A44^ADT_A43")
    ack = Message.decode(await client_for(gw).send(a44.encode()))
    assert ack.get("MSA-1") == "AA"

    async def errored() -> list[Any]:
        return await gw.store.list_messages(
            status="ERROR", control_id=None, channel="adt", limit=10, before_seq=None
        )

    (row,) = await until(errored, 30, "the refused A44 kept in ERROR")
    trace = await gw.store.get_message(row["id"], with_payloads=False)
    assert trace is not None
    assert any("A44" in str(stage.get("detail")) for stage in trace["stages"])


@pytest.mark.parametrize("workers", [0, 1])
async def test_an_identifier_without_namespace_is_refused_naming_the_field(
    start_gateway, client_for, tmp_path, workers
) -> None:
    gw = await start_gateway(config(tmp_path, workers, missing_namespace="reject"))
    ack = Message.decode(await client_for(gw).send(ORU_WITHOUT_AUTHORITY.encode()))
    assert ack.get("MSA-1") == "AE"
    assert ack.get("MSA-2") == "R-77"
    assert ack.get("ERR-3.1") == "103"
    assert ack.get("ERR-2") == "OBR^1^3^1"
    rows = await gw.store.list_messages(
        status="ERROR", control_id=None, channel=None, limit=10, before_seq=None
    )
    assert len(rows) == 1


async def test_a_sender_namespace_takes_the_same_message_in(start_gateway, client_for) -> None:
    gw = await start_gateway(steps=mapping_step(missing_namespace="sender"))
    ack = Message.decode(await client_for(gw).send(ORU_WITHOUT_AUTHORITY.encode()))
    assert ack.get("MSA-1") == "AA"
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 1)
    assert b"urn:passerelle:sender:LABO-EST:SIL:filler-order|RES456" in far.received[0][1]


@pytest.mark.parametrize("workers", [0, 1])
async def test_screening_sees_the_message_as_the_steps_before_it_made_it(
    start_gateway, client_for, tmp_path, workers
) -> None:
    """A channel that drops a Z segment before mapping with ``unmapped: reject`` must not refuse
    the message for that segment at intake, nor change what intake journals."""
    cfg = config(tmp_path, workers, unmapped="reject")
    cfg.data["channels"][0]["steps"] = [
        {"type": "set_field", "path": "MSH-4", "value": "CHU-EST^1.2.250.1.71.4.2.2.4455^ISO"},
        {"type": "remove_segments", "segments": ["ZXY"]},
        *cfg.data["channels"][0]["steps"],
    ]
    gw = await start_gateway(cfg)
    message = (
        ORU_WITHOUT_AUTHORITY.replace("RES456", "RES456^LABO-EST^1.2.250.1.71.4.2.2.5551^ISO")
        .replace("R-77", "R-78")
        .replace("OBR|1|", "OBR||")  # a set id no rule reads
        + "ZXY|local|value\r"
    )
    ack = Message.decode(await client_for(gw).send(message.encode()))
    assert ack.get("MSA-1") == "AA", ack.get("ERR-8")
    (row,) = await gw.store.list_messages(
        status=None, control_id="R-78", channel=None, limit=10, before_seq=None
    )
    stored = await gw.store.get_message(row["id"], with_payloads=True)
    assert stored is not None
    assert b"ZXY|local|value" in stored["raw"]  # intake keeps the bytes as sent
