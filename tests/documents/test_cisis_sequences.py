"""Deletion and replacement: a deletion deletes and never replaces; a replacement
supersedes only what it replaces; no sequence of the CI-SIS flows leaves the patient without the
current version of a document that was only replaced.

Before the fix: an MDM^T04 carrying TXA-13 (as both ANS deletion examples do) was mapped with
relatesTo replaces, so the store superseded the parent (or refused the deletion when the parent was
already superseded); a replayed T10 was refused (409: its target already superseded); a T10 whose
parent the gateway never received was refused (422) and the new version lost; an ORU with OBX-11 D
or ORC-1 CA published a current document and a final report.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.core.status import Status
from tests.documents.cisis_messages import (
    Feed,
    all_flags,
    convert,
    mdm_with_flags,
    oru_with_flags,
    reader,
    visible_to,
)
from tests.documents.conftest import (
    Client,
    document,
    ids,
    location_id,
    provide_bundle,
    publish,
    search,
)
from tests.documents.mdm_messages import PDF_V2
from tests.fhir.conftest import INS

CURRENT, GONE, OLD = "current", "entered-in-error", "superseded"


def _t02(doc: str, control: str) -> bytes:
    return mdm_with_flags("T02", control, doc, all_flags())


def _t10(doc: str, parent: str, control: str) -> bytes:
    return mdm_with_flags(
        "T10", control, doc, all_flags(), parent=parent, data=PDF_V2, kind="application^pdf", result="C"
    )


def _t04(doc: str, control: str, parent: str = "") -> bytes:
    return mdm_with_flags("T04", control, doc, all_flags(), parent=parent, result="D")


@pytest.fixture
async def feed(tmp_path: Path) -> AsyncIterator[Feed]:
    f = Feed(tmp_path / "fhir.db")
    yield f
    await f.aclose()


async def _publish_all(feed: Feed, *messages: bytes) -> None:
    for message in messages:
        result = await feed.publish(message)
        assert result.status is Status.SENT, result.detail


async def _states(path: Path) -> dict[str, list[str]]:
    async with reader(path) as client:
        return {status: await visible_to(client, "admin", status) for status in (CURRENT, OLD, GONE)}


# -- the mapping ----------------------------------------------------------------------------------


def test_a_deletion_carrying_its_parent_number_replaces_nothing() -> None:
    result = convert(_t04("58133", "C-1", parent="58132"))
    [doc] = [
        e["resource"] for e in result.bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference"
    ]
    assert doc["status"] == GONE and "relatesTo" not in doc
    assert "TXA-13[1].1" in result.unmapped  # the parent number is reported, not dropped
    assert any("TXA-13: MDM^T04 does not replace a document" in w for w in result.warnings)


def test_a_replacement_names_what_it_replaces() -> None:
    [doc] = [
        e["resource"]
        for e in convert(_t10("58133", "58132", "C-1")).bundle["entry"]
        if e["resource"]["resourceType"] == "DocumentReference"
    ]
    assert doc["status"] == CURRENT
    assert [r["code"] for r in doc["relatesTo"]] == ["replaces"]


@pytest.mark.parametrize(
    ("result", "order_control", "report"),
    [("D", "CA", GONE), ("D", "NW", GONE), ("F", "CA", GONE), ("F", "NW", "final"), ("C", "RO", "final")],
)
def test_an_oru_deletion_withdraws_the_document_and_its_report(
    result: str, order_control: str, report: str
) -> None:
    mapped = convert(oru_with_flags("C-1", all_flags(), result=result, order_control=order_control))
    resources = {e["resource"]["resourceType"]: e["resource"] for e in mapped.bundle["entry"]}
    deleted = result == "D" or order_control == "CA"
    assert resources["DocumentReference"]["status"] == (GONE if deleted else CURRENT)
    assert resources["DiagnosticReport"]["status"] == report
    disagree = (result == "D") != (order_control == "CA")
    assert any(w.startswith("ORC-1: order control") for w in mapped.warnings) == disagree


# -- through the document store ---------------------------------------------------------------------


async def test_replaced_then_its_old_version_deleted(feed: Feed, tmp_path: Path) -> None:
    await _publish_all(feed, _t02("58132", "C-1"), _t10("58133", "58132", "C-2"), _t04("58132", "C-3"))
    states = await _states(tmp_path / "fhir.db")
    assert states[CURRENT] == ["58133"]  # the new version stays the patient's
    assert states[GONE] == ["58132"]


async def test_a_deletion_of_an_unknown_document_touches_no_other(feed: Feed, tmp_path: Path) -> None:
    await _publish_all(feed, _t02("58132", "C-1"), _t04("58199", "C-2", parent="58132"))
    states = await _states(tmp_path / "fhir.db")
    assert states[CURRENT] == ["58132"]
    assert states[OLD] == []


async def test_a_replayed_replacement_changes_nothing(feed: Feed, tmp_path: Path) -> None:
    replacement = _t10("58133", "58132", "C-2")
    await _publish_all(feed, _t02("58132", "C-1"), replacement, replacement)
    assert await _states(tmp_path / "fhir.db") == {CURRENT: ["58133"], OLD: ["58132"], GONE: []}
    await _publish_all(feed, _t02("58132", "C-1"))  # the first version sent again stays superseded
    assert await _states(tmp_path / "fhir.db") == {CURRENT: ["58133"], OLD: ["58132"], GONE: []}


async def test_the_ans_sequence_publish_replace_delete(feed: Feed, tmp_path: Path) -> None:
    """As the ANS examples: the T04 names the version it deletes (TXA-12) and its parent (TXA-13)."""
    await _publish_all(
        feed, _t02("58132", "C-1"), _t10("58133", "58132", "C-2"), _t04("58133", "C-3", parent="58132")
    )
    assert await _states(tmp_path / "fhir.db") == {CURRENT: [], OLD: ["58132"], GONE: ["58133"]}


async def test_a_replacement_of_a_document_never_received_is_published(feed: Feed, tmp_path: Path) -> None:
    await _publish_all(feed, _t10("58133", "58132", "C-1"))
    assert await _states(tmp_path / "fhir.db") == {CURRENT: ["58133"], OLD: [], GONE: []}
    async with reader(tmp_path / "fhir.db") as client:
        resp = await client.get(
            "/fhir/DocumentReference?patient.identifier=urn:oid:1.2.250.1.213.1.4.8|2840775123456&status=current",
            headers={"Authorization": "Bearer admin-token-0123456789"},
        )
        [entry] = (await resp.json(content_type=None))["entry"]
    # the relation is kept, by the replaced document's identifier
    [relation] = entry["resource"]["relatesTo"]
    assert relation["code"] == "replaces" and relation["target"]["identifier"]["value"] == "58132"


async def test_an_oru_deletion_after_its_publication(feed: Feed, tmp_path: Path) -> None:
    await _publish_all(
        feed,
        oru_with_flags("C-1", all_flags()),
        oru_with_flags("C-2", all_flags(), result="D", order_control="CA"),
    )
    states = await _states(tmp_path / "fhir.db")
    assert states[CURRENT] == [] and len(states[GONE]) == 1


# -- the store rule itself (ITI-65) ----------------------------------------------------------------


async def test_a_document_that_is_not_current_supersedes_nothing(client: Client, patient_id: str) -> None:
    status, body = await publish(client, provide_bundle(document(master="urn:oid:1.2.250.1.999.1.1")))
    assert status == 200, body
    old_id = location_id(body["entry"][1])
    deleted = document(
        master="urn:oid:1.2.250.1.999.1.2",
        status="entered-in-error",
        relatesTo=[{"code": "replaces", "target": {"reference": f"DocumentReference/{old_id}"}}],
    )
    status, body = await publish(client, provide_bundle(deleted))
    assert status == 200, body
    assert any("replaces nothing" in i["diagnostics"] for i in _issues(body))
    status, found = await search(client, f"patient.identifier={INS}|2840775123456&status=current", "admin")
    assert status == 200 and ids(found) == [old_id]


def _issues(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        issue
        for entry in body["entry"]
        for issue in ((entry["response"].get("outcome") or {}).get("issue") or [])
    ]
