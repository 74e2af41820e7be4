"""A List tells no one of a document they may not see (ITI-66, List reads, generic List searches).

A SubmissionSet names the documents it brought. A caller who may not see one of them does not
see that entry; when every document a List names is hidden from the caller, the List itself is
not found either (it would say that documents were published, when, by whom).
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.store.documents import MHD_LIST_TYPES
from tests.documents.conftest import (
    CONFIDENTIALITY,
    INS,
    PATIENT_INS,
    Client,
    auth,
    document,
    location_id,
    provide_bundle,
    publish,
    visibility,
)

MINE = f"patient.identifier={INS}|{PATIENT_INS}"
SUBMISSIONS = f"{MINE}&code={MHD_LIST_TYPES}|submissionset"


def _doc(n: int, *codes: str) -> dict[str, Any]:
    data = f"<ClinicalDocument>{n}</ClinicalDocument>".encode()
    labels = ((CONFIDENTIALITY, "N"), *(visibility(c) for c in codes))
    return document(master=f"urn:oid:1.2.250.1.999.3.{n}", data=data, labels=labels)


async def _submit(client: Client, *docs: dict[str, Any], ident: str) -> tuple[str, list[str]]:
    bundle = provide_bundle(*docs)
    bundle["entry"][0]["resource"]["identifier"][0]["value"] = ident
    status, answer = await publish(client, bundle)
    assert status == 200, answer
    return location_id(answer["entry"][0]), [location_id(e) for e in answer["entry"][1 : 1 + len(docs)]]


@pytest.fixture
async def lists(client: Client) -> dict[str, Any]:
    """Three SubmissionSets of the patient's: one whose only document is masked from other
    professionals, one with a visible and a masked document, one hidden from the patient."""
    masked, (masked_doc,) = await _submit(client, _doc(1, "MASQUE_PS"), ident="urn:oid:1.2.250.1.999.9.1")
    mixed, (open_doc, hidden_doc) = await _submit(
        client, _doc(2), _doc(3, "MASQUE_PS"), ident="urn:oid:1.2.250.1.999.9.2"
    )
    secret, (secret_doc,) = await _submit(
        client, _doc(4, "INVISIBLE_PATIENT"), ident="urn:oid:1.2.250.1.999.9.3"
    )
    return {
        "masked": masked,
        "mixed": mixed,
        "secret": secret,
        "masked_doc": masked_doc,
        "open_doc": open_doc,
        "hidden_doc": hidden_doc,
        "secret_doc": secret_doc,
    }


def _items(resource: dict[str, Any]) -> set[str]:
    return {str(e["item"]["reference"]).rsplit("/", 1)[-1] for e in resource.get("entry") or ()}


async def _found(client: Client, query: str, who: str) -> dict[str, dict[str, Any]]:
    resp = await client.get(f"/fhir/List?{query}", headers=auth(who))
    assert resp.status == 200, await resp.text()
    body = await resp.json(content_type=None)
    found = {e["resource"]["id"]: e["resource"] for e in body.get("entry") or ()}
    assert body["total"] == len(found), body  # the total counts what is shown, no more
    return found


@pytest.mark.parametrize("query", [SUBMISSIONS, MINE, "", "_count=1&_offset=0"])
async def test_another_professional_sees_no_entry_or_list_of_a_masked_document(
    client: Client, lists: dict[str, Any], query: str
) -> None:
    if "_count=1" in query:
        seen: dict[str, dict[str, Any]] = {}
        for offset in range(4):
            resp = await client.get(f"/fhir/List?_count=1&_offset={offset}", headers=auth("pro2"))
            body = await resp.json(content_type=None)
            assert body["total"] == 2, body  # the masked SubmissionSet is not counted
            seen |= {e["resource"]["id"]: e["resource"] for e in body["entry"]}
        found = seen
    else:
        found = await _found(client, query, "pro2")
    assert lists["masked"] not in found
    assert _items(found[lists["mixed"]]) == {lists["open_doc"]}
    assert _items(found[lists["secret"]]) == {lists["secret_doc"]}


async def test_the_author_and_unrestricted_callers_see_every_entry(
    client: Client, lists: dict[str, Any]
) -> None:
    for who in ("pro", "admin", "operator"):
        found = await _found(client, SUBMISSIONS, who)
        assert set(found) == {lists["masked"], lists["mixed"], lists["secret"]}, who
        assert _items(found[lists["mixed"]]) == {lists["open_doc"], lists["hidden_doc"]}, who


async def test_list_reads_follow_the_same_rule(client: Client, lists: dict[str, Any]) -> None:
    resp = await client.get(f"/fhir/List/{lists['masked']}", headers=auth("pro2"))
    assert resp.status == 404
    assert (await resp.json(content_type=None))["resourceType"] == "OperationOutcome"
    resp = await client.get(f"/fhir/List/{lists['mixed']}", headers=auth("pro2"))
    assert resp.status == 200
    assert _items(await resp.json(content_type=None)) == {lists["open_doc"]}
    resp = await client.get(f"/fhir/List/{lists['masked']}", headers=auth("pro"))
    assert resp.status == 200  # its author sees it
    resp = await client.get(f"/fhir/List/{lists['secret']}", headers=auth("patient"))
    assert resp.status == 404


@pytest.mark.parametrize("who", ["patient", "rep"])
async def test_the_patient_sees_no_list_of_a_document_hidden_from_them(
    client: Client, lists: dict[str, Any], who: str
) -> None:
    for query in (SUBMISSIONS, MINE, ""):
        found = await _found(client, query, who)
        assert lists["secret"] not in found, (who, query)
        assert _items(found[lists["mixed"]]) == {lists["open_doc"], lists["hidden_doc"]}
        assert lists["masked"] in found


async def test_audience_masks_hide_lists_too(client: Client) -> None:
    only, _ = await _submit(client, _doc(5, "MASQUE_PT"), ident="urn:oid:1.2.250.1.999.9.5")
    assert only not in await _found(client, SUBMISSIONS, "third")
    assert only in await _found(client, SUBMISSIONS, "social")
