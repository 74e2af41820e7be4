"""The fhir_mapping step in a running channel, and `passerelle convert` on the same code path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from gateway.hl7.er7 import Message
from tests.conftest import FakeDestination, wait_for
from tests.mapping.test_adt import A01, A01_UNMAPPED, MAPPINGS


async def test_channel_maps_to_a_fhir_bundle_and_records_unmapped_content(start_gateway, client_for) -> None:
    gw = await start_gateway(steps=[{"type": "fhir_mapping", "directory": str(MAPPINGS)}])
    ack = await client_for(gw).send(A01.encode())
    assert Message.decode(ack).get("MSA-1") == "AA"
    far = FakeDestination.instances["far"]
    await wait_for(lambda: len(far.received) == 1)
    bundle = orjson.loads(far.received[0][1])
    assert bundle["type"] == "transaction"
    assert [e["resource"]["resourceType"] for e in bundle["entry"]] == [
        "Patient",
        "Encounter",
        "Encounter",
        "Location",  # PV1-3's place
        "Location",  # ZBE-7's medical unit
    ]
    await gw.store.flush()
    trace = await gw.store.get_message(far.received[0][0].id, with_payloads=False)
    assert trace is not None
    transformed = next(s for s in trace["stages"] if s["stage"] == "transformed")
    assert transformed["detail"]["unmapped"] == A01_UNMAPPED
    step = next(s for s in trace["stages"] if s["stage"].startswith("step:"))
    assert step["content_type"] == "application/fhir+json"
    assert gw.channels["adt"].snapshot()["counters"]["unmapped"] == 1


async def test_channel_can_reject_unmapped_content(start_gateway, client_for) -> None:
    gw = await start_gateway(
        queue=False,
        ack={"timing": "after_transform"},
        steps=[{"type": "fhir_mapping", "directory": str(MAPPINGS), "unmapped": "reject"}],
    )
    nack = Message.decode(await client_for(gw).send(A01.encode()))
    assert nack.get("MSA-1") == "AE"
    assert nack.get("ERR-3.1") == "101"
    assert "EVN-2" in nack.get("ERR-8")
    assert FakeDestination.instances["far"].received == []


def test_convert_prints_the_bundle_and_what_was_left(tmp_path: Path) -> None:
    source = tmp_path / "a01.hl7"
    source.write_bytes(A01.replace("\r", "\n").encode())
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "convert", str(source), "--mappings", str(MAPPINGS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    out = orjson.loads(run.stdout)
    assert out["unmapped"] == A01_UNMAPPED
    assert out["bundle"]["entry"][0]["resource"]["name"][0]["family"] == "GÉRARD"
    bad = tmp_path / "a44.hl7"
    bad.write_bytes(A01.replace("ADT^A01^ADT_A01", "ADT^A44^ADT_A43").encode())
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "convert", str(bad), "--mappings", str(MAPPINGS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert orjson.loads(run.stdout)["error"]["code"] == "200"


def test_convert_finds_the_shipped_mappings_wherever_it_runs(tmp_path: Path) -> None:
    source = tmp_path / "a01.hl7"
    source.write_bytes(A01.encode())
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "convert", str(source)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # no mappings/ here
    )
    assert run.returncode == 0, run.stderr
    assert orjson.loads(run.stdout)["unmapped"] == A01_UNMAPPED
    # a path given and wrong is an error, never "no mappings"
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "convert", str(source), "--mappings", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert run.returncode == 2
    assert "no such mapping directory" in run.stderr
