"""The document store's visibility holds on every way in: List reads and searches, Bundle GET
entries and Binary searches, besides the MHD routes."""

from __future__ import annotations

from typing import Any

import pytest

from tests.documents.conftest import (
    FHIR_JSON,
    OTHER_INS,
    Client,
    auth,
    document,
    location_id,
    provide_bundle,
    publish,
)
from tests.fhir.conftest import INS


def about(ins: str, master: str) -> dict[str, Any]:
    # Bytes of their own: a Binary is content-addressed, the same bytes would be the same Binary.
    data = f"<ClinicalDocument>{master}</ClinicalDocument>".encode()
    bundle = provide_bundle(document(data=data, master=master, subject=f"Patient?identifier={INS}|{ins}"))
    bundle["entry"][0]["resource"]["subject"] = {"reference": f"Patient?identifier={INS}|{ins}"}
    bundle["entry"][0]["resource"]["identifier"][0]["value"] = master + ".9"
    return bundle


@pytest.fixture
async def published(client: Client) -> dict[str, str]:
    """The ids of a SubmissionSet, document and Binary of the patient's, and of another patient's."""
    out: dict[str, str] = {}
    for who, ins, master in (("own", "2840775123456", "urn:oid:1.2.250.1.999.7.1"),
                             ("other", OTHER_INS, "urn:oid:1.2.250.1.999.7.2")):  # fmt: skip
        status, answer = await publish(client, about(ins, master))
        assert status == 200, answer
        out[f"{who}_list"] = location_id(answer["entry"][0])
        out[f"{who}_doc"] = location_id(answer["entry"][1])
        resp = await client.get(f"/fhir/DocumentReference/{out[f'{who}_doc']}", headers=auth("pro"))
        url = (await resp.json(content_type=None))["content"][0]["attachment"]["url"]
        out[f"{who}_binary"] = url.rsplit("/", 1)[1]
    return out


async def status_of(client: Client, path: str, who: str) -> int:
    resp = await client.get(path, headers=auth(who))
    return resp.status


async def test_list_read_follows_the_patient_scope(client: Client, published: dict[str, str]) -> None:
    own, other = published["own_list"], published["other_list"]
    resp = await client.get(f"/fhir/List/{own}", headers=auth("patient"))
    assert resp.status == 200 and resp.headers["ETag"] == 'W/"1"'
    assert (await resp.json(content_type=None))["id"] == own
    resp = await client.get(f"/fhir/List/{other}", headers=auth("patient"))
    assert resp.status == 404
    assert (await resp.json(content_type=None))["resourceType"] == "OperationOutcome"
    # professionals and operators are not limited to some patients
    for who in ("pro", "operator", "admin"):
        assert await status_of(client, f"/fhir/List/{other}", who) == 200
    assert await status_of(client, "/fhir/List/no-such-list", "patient") == 404


async def list_ids(client: Client, query: str, who: str) -> set[str]:
    resp = await client.get(f"/fhir/List?{query}", headers=auth(who))
    assert resp.status == 200, await resp.text()
    return {e["resource"]["id"] for e in (await resp.json(content_type=None))["entry"]}


async def test_generic_list_search_is_narrowed_for_a_patient(
    client: Client, published: dict[str, str]
) -> None:
    own, other = published["own_list"], published["other_list"]
    assert await list_ids(client, "", "pro") == {own, other}
    assert await list_ids(client, "", "patient") == {own}
    assert await list_ids(client, f"_id={other}", "patient") == set()
    assert await list_ids(client, f"_id={own},{other}", "patient") == {own}
    resp = await client.get("/fhir/List", headers=auth("patient"))
    others = await list_ids(client, f"subject.identifier={INS}|{OTHER_INS}", "patient")
    assert others == set() and resp.status == 200
    # ITI-66 already checked whose record it is
    resp = await client.get(f"/fhir/List?patient.identifier={INS}|{OTHER_INS}", headers=auth("patient"))
    assert resp.status == 403


def batch(*urls: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": url}} for url in urls],
    }


async def test_bundle_get_entries_do_not_read_documents_for_limited_callers(
    client: Client, published: dict[str, str]
) -> None:
    urls = [
        f"DocumentReference/{published['other_doc']}",
        f"List/{published['other_list']}",
        f"Binary/{published['other_binary']}",
        f"DocumentReference?patient.identifier={INS}|{OTHER_INS}",
    ]
    for url in urls:
        for who in ("patient", "pro"):  # a professional is limited by the masking codes
            resp = await client.post(
                "/fhir", json=batch(url), headers={**auth(who), "Content-Type": FHIR_JSON}
            )
            body = await resp.json(content_type=None)
            assert resp.status == 403, (url, who, body)
            assert body["issue"][0]["expression"] == ["Bundle.entry[0].request.url"]
    # an administrator (no masking) may; other GET entries are not concerned
    resp = await client.post(
        "/fhir", json=batch(urls[0]), headers={**auth("admin"), "Content-Type": FHIR_JSON}
    )
    assert resp.status == 200
    assert (await resp.json(content_type=None))["entry"][0]["response"]["status"].startswith("200")
    resp = await client.post(
        "/fhir", json=batch("Patient?_count=1"), headers={**auth("pro"), "Content-Type": FHIR_JSON}
    )
    assert resp.status == 200


async def test_documents_and_bytes_of_another_patient_stay_hidden(
    client: Client, published: dict[str, str]
) -> None:
    assert await status_of(client, f"/fhir/DocumentReference/{published['own_doc']}", "patient") == 200
    assert await status_of(client, f"/fhir/DocumentReference/{published['other_doc']}", "patient") == 404
    assert published["own_binary"] != published["other_binary"]
    assert await status_of(client, f"/fhir/Binary/{published['own_binary']}", "patient") == 200
    assert await status_of(client, f"/fhir/Binary/{published['other_binary']}", "patient") == 404
    # a Binary search would list documents past these rules
    assert await status_of(client, "/fhir/Binary", "patient") == 403
    assert await status_of(client, "/fhir/Binary", "pro") == 403
    resp = await client.get("/fhir/Binary", headers=auth("admin"))
    assert resp.status == 200 and (await resp.json(content_type=None))["total"] >= 2
