"""Access scoping on the generic /fhir routes, over real HTTP with bearer tokens: a patient reads
their own compartment only and writes nothing there, an operator reads only, and documents keep
the document store's rules whichever route reaches them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.http.app import build_app
from gateway.http.auth import TokenTable
from gateway.store.audit import AuditLog
from gateway.store.documents import MHD_LIST_TYPES
from gateway.store.fhir import SqliteFhirRepository
from tests.documents.conftest import (
    FHIR_JSON,
    OTHER_INS,
    PATIENT_INS,
    TOKENS,
    Client,
    auth,
    document,
    location_id,
    patient_resource,
    provide_bundle,
    publish,
    visibility,
)
from tests.fhir.conftest import INS, Clock, FhirOnlyRuntime

UNKNOWN_INS = "2991299123456"


@pytest.fixture
async def repo(tmp_path: Path) -> AsyncIterator[SqliteFhirRepository]:
    r = SqliteFhirRepository(tmp_path / "fhir.db", clock=Clock())
    await r.open()
    yield r
    await r.close()


@pytest.fixture
async def audit(tmp_path: Path) -> AsyncIterator[AuditLog]:
    log = AuditLog(tmp_path / "audit.db")
    await log.open()
    yield log
    await log.close()


@pytest.fixture
async def client(repo: SqliteFhirRepository, audit: AuditLog) -> AsyncIterator[Client]:
    app = build_app(FhirOnlyRuntime(repo), authenticator=TokenTable(TOKENS.values()), audit=audit)
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as c:
        yield c


def observation(patient: str, text: str = "glycémie", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": text},
        "subject": {"reference": f"Patient/{patient}"},
        **extra,
    }


def encounter(patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{patient}"},
    }


@pytest.fixture
async def world(repo: SqliteFhirRepository) -> dict[str, Any]:
    """The caller's Patient with 3 Observations; another Patient with 4 and an Encounter."""
    own, _ = await repo.create(patient_resource())
    other, _ = await repo.create(patient_resource(OTHER_INS, "100002", "Martin"))
    other_enc, _ = await repo.create(encounter(other["id"]))
    # One of the caller's Observations points at the other patient's Encounter (a bad feed).
    own_obs = [
        (await repo.create(observation(own["id"], encounter={"reference": f"Encounter/{other_enc['id']}"})))[
            0
        ]
    ]
    own_obs += [(await repo.create(observation(own["id"], f"obs {i}")))[0] for i in range(2)]
    other_obs = [(await repo.create(observation(other["id"], f"obs {i}")))[0] for i in range(4)]
    practitioner, _ = await repo.create({"resourceType": "Practitioner", "active": True})
    return {
        "own": own["id"],
        "other": other["id"],
        "other_enc": other_enc["id"],
        "own_obs": [o["id"] for o in own_obs],
        "other_obs": [o["id"] for o in other_obs],
        "practitioner": practitioner["id"],
    }


async def get(client: Client, path: str, who: str) -> tuple[int, dict[str, Any]]:
    resp = await client.get(path, headers=auth(who))
    return resp.status, await resp.json(content_type=None)


async def send(
    client: Client, method: str, path: str, who: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    headers = {**auth(who), "Content-Type": FHIR_JSON}
    resp = await client.request(method, path, json=body, headers=headers)
    return resp.status, await resp.json(content_type=None)


def ids(bundle: dict[str, Any], mode: str = "match") -> set[str]:
    return {e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode}


# -- patients: reads ----------------------------------------------------------------------------


async def test_a_patient_reads_their_own_compartment_only(client: Client, world: dict[str, Any]) -> None:
    assert (await get(client, f"/fhir/Patient/{world['own']}", "patient"))[0] == 200
    assert (await get(client, f"/fhir/Observation/{world['own_obs'][1]}", "patient"))[0] == 200
    # outside: answered as if absent
    for path in (f"/fhir/Patient/{world['other']}", f"/fhir/Observation/{world['other_obs'][0]}",
                 f"/fhir/Encounter/{world['other_enc']}", "/fhir/Observation/no-such-one"):  # fmt: skip
        status, body = await get(client, path, "patient")
        assert status == 404, path
        assert body["resourceType"] == "OperationOutcome"
    # a deleted resource of another patient is 404 too (410 would tell it existed)
    assert (await send(client, "DELETE", f"/fhir/Observation/{world['other_obs'][3]}", "admin"))[0] == 200
    assert (await get(client, f"/fhir/Observation/{world['other_obs'][3]}", "patient"))[0] == 404
    assert (await get(client, f"/fhir/Observation/{world['other_obs'][3]}", "pro"))[0] == 410
    # a type outside the Patient compartment is not theirs to read at all
    status, body = await get(client, f"/fhir/Practitioner/{world['practitioner']}", "patient")
    assert status == 403 and body["issue"][0]["code"] == "forbidden"
    # others are not limited to a patient
    for who in ("pro", "operator", "admin"):
        assert (await get(client, f"/fhir/Observation/{world['other_obs'][0]}", who))[0] == 200


async def test_a_patient_search_is_filtered_in_the_query(client: Client, world: dict[str, Any]) -> None:
    status, bundle = await get(client, "/fhir/Observation", "patient")
    assert status == 200 and bundle["total"] == 3 and ids(bundle) == set(world["own_obs"])
    status, bundle = await get(client, "/fhir/Observation", "pro")
    assert bundle["total"] == 7
    # paging counts only what the caller may see
    status, page = await get(client, "/fhir/Observation?_count=2", "patient")
    assert page["total"] == 3 and len(page["entry"]) == 2
    following = next(link["url"] for link in page["link"] if link["relation"] == "next")
    status, rest = await get(client, following[following.index("/fhir/") :], "patient")
    assert status == 200 and len(rest["entry"]) == 1
    assert ids(page) | ids(rest) == set(world["own_obs"])
    assert not [link for link in rest["link"] if link["relation"] == "next"]
    # the Patient search, and searches naming the caller's own record
    status, bundle = await get(client, "/fhir/Patient", "patient")
    assert ids(bundle) == {world["own"]} and bundle["total"] == 1
    own_ids = ",".join(world["own_obs"][:2])
    queries = [f"patient={world['own']}", f"subject=Patient/{world['own']}"]
    queries += [f"patient.identifier={INS}|{PATIENT_INS}", f"_id={own_ids}"]
    for query in queries:
        status, bundle = await get(client, f"/fhir/Observation?{query}", "patient")
        assert status == 200, query
        assert ids(bundle) <= set(world["own_obs"]) and bundle["total"] >= 2, query
    # _id of another patient's resource: simply not found by this caller
    status, bundle = await get(client, f"/fhir/Observation?_id={world['other_obs'][0]}", "patient")
    assert status == 200 and bundle["total"] == 0


async def test_an_include_outside_the_compartment_is_left_out(client: Client, world: dict[str, Any]) -> None:
    query = f"/fhir/Observation?_id={world['own_obs'][0]}&_include=Observation:encounter"
    _, bundle = await get(client, query, "patient")
    assert ids(bundle) == {world["own_obs"][0]} and ids(bundle, "include") == set()
    _, bundle = await get(client, query, "pro")
    assert ids(bundle, "include") == {world["other_enc"]}
    _, bundle = await get(client, "/fhir/Observation?_include=Observation:subject", "patient")
    assert ids(bundle, "include") == {world["own"]}


@pytest.mark.parametrize(
    "query",
    [
        "Observation?subject=Patient/{other}",
        "Observation?patient={other}",
        "Observation?subject={other}",
        "Observation?subject=http://elsewhere.example/fhir/Patient/{other}",
        "Observation?patient.identifier=urn:oid:1.2.250.1.213.1.4.8|{other_ins}",
        "Observation?subject.identifier={other_ins}",
        "Observation?patient={own},{other}",
        # an identifier nobody carries is refused the same way: no telling who exists
        "Observation?patient.identifier=urn:oid:1.2.250.1.213.1.4.8|{unknown}",
        "Patient?_id={other}",
        "Patient?identifier=urn:oid:1.2.250.1.213.1.4.8|{other_ins}",
        "Patient?identifier={unknown}",
        "Practitioner",
        "Organization?_id=x",
    ],
)
async def test_a_search_naming_another_patient_is_refused(
    client: Client, world: dict[str, Any], query: str
) -> None:
    path = "/fhir/" + query.format(
        other=world["other"], own=world["own"], other_ins=OTHER_INS, unknown=UNKNOWN_INS
    )
    status, body = await get(client, path, "patient")
    assert status == 403, (query, body)
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "forbidden"
    assert (await get(client, path, "pro"))[0] == 200


async def test_a_patient_token_without_identifiers_sees_nothing(
    repo: SqliteFhirRepository, world: dict[str, Any]
) -> None:
    tokens = [{"token": "bare-patient-token-0123", "subject": "patient-9", "role": "patient"}]
    app = build_app(FhirOnlyRuntime(repo), authenticator=TokenTable(tokens))
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as c:
        resp = await c.get("/fhir/Observation", headers={"Authorization": "Bearer bare-patient-token-0123"})
        assert resp.status == 403
        resp = await c.get(
            f"/fhir/Patient/{world['own']}", headers={"Authorization": "Bearer bare-patient-token-0123"}
        )
        assert resp.status == 403


# -- patients: writes ---------------------------------------------------------------------------


async def test_a_patient_writes_nothing_through_the_generic_routes(
    client: Client, repo: SqliteFhirRepository, world: dict[str, Any]
) -> None:
    own_obs = world["own_obs"][1]
    attempts = [
        ("POST", "/fhir/Patient", patient_resource("1840775999999", "100009", "Durand")),
        ("POST", "/fhir/Observation", observation(world["own"])),
        ("PUT", f"/fhir/Observation/{own_obs}", observation(world["own"], "changed", id=own_obs)),
        ("PUT", f"/fhir/Patient?identifier={INS}|{PATIENT_INS}", patient_resource()),
        ("PUT", "/fhir/List/l1", {"resourceType": "List", "status": "current", "mode": "working"}),
        ("DELETE", f"/fhir/Observation/{own_obs}", None),
        ("DELETE", "/fhir/Binary/b1", None),
        (
            "POST",
            "/fhir",
            {
                "resourceType": "Bundle",
                "type": "batch",
                "entry": [
                    {"request": {"method": "GET", "url": f"Patient/{world['own']}"}},
                    {"request": {"method": "DELETE", "url": f"Observation/{own_obs}"}},
                ],
            },
        ),
    ]
    for method, path, body in attempts:
        status, answer = await send(client, method, path, "patient", body)
        assert status == 403, (method, path, answer)
        assert answer["issue"][0]["code"] == "forbidden"
    # nothing changed
    _, bundle = await get(client, "/fhir/Observation", "admin")
    assert bundle["total"] == 7
    stored = await repo.read("Observation", own_obs)
    assert stored is not None and stored["meta"]["versionId"] == "1"
    _, bundle = await get(client, "/fhir/Patient", "admin")
    assert bundle["total"] == 2


def batch(kind: str, *urls: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [{"request": {"method": "GET", "url": url}} for url in urls],
    }


async def test_bundle_get_entries_follow_the_same_rules(client: Client, world: dict[str, Any]) -> None:
    urls = [
        f"Observation/{world['own_obs'][1]}",
        f"Observation/{world['other_obs'][0]}",
        f"Observation?patient={world['other']}",
        "Observation?_count=2",
        f"Observation?_id={world['own_obs'][0]}&_include=Observation:encounter",
        f"Practitioner/{world['practitioner']}",
    ]
    status, answer = await send(client, "POST", "/fhir", "patient", batch("batch", *urls))
    assert status == 200 and answer["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in answer["entry"]]
    assert statuses == ["200 OK", "404 Not Found", "403 Forbidden", "200 OK", "200 OK", "403 Forbidden"]
    assert answer["entry"][0]["resource"]["id"] == world["own_obs"][1]
    assert answer["entry"][0]["response"]["etag"] == 'W/"1"'
    page = answer["entry"][3]["resource"]
    assert page["total"] == 3 and len(page["entry"]) == 2
    assert ids(page) <= set(world["own_obs"])
    assert ids(answer["entry"][4]["resource"], "include") == set()
    # the same batch for a professional runs unrestricted
    status, answer = await send(client, "POST", "/fhir", "pro", batch("batch", *urls))
    assert [e["response"]["status"][:3] for e in answer["entry"]] == ["200"] * 6
    assert answer["entry"][3]["resource"]["total"] == 7
    # a transaction is all or nothing: one read outside the compartment fails it
    status, body = await send(client, "POST", "/fhir", "patient", batch("transaction", *urls[:2]))
    assert status == 404 and body["issue"][0]["expression"] == ["Bundle.entry[1].request.url"]
    status, body = await send(client, "POST", "/fhir", "patient", batch("transaction", urls[0], urls[3]))
    assert status == 200 and body["type"] == "transaction-response"


# -- operators ---------------------------------------------------------------------------------


async def test_an_operator_reads_fhir_but_does_not_write(client: Client, world: dict[str, Any]) -> None:
    obs = world["other_obs"][0]
    assert (await get(client, f"/fhir/Observation/{obs}", "operator"))[0] == 200
    _, bundle = await get(client, "/fhir/Observation", "operator")
    assert bundle["total"] == 7
    status, _ = await send(client, "POST", "/fhir", "operator", batch("batch", f"Observation/{obs}"))
    assert status == 200
    attempts = [
        ("POST", "/fhir/Observation", observation(world["own"])),
        ("PUT", f"/fhir/Observation/{obs}", observation(world["other"], "changed", id=obs)),
        ("PUT", f"/fhir/Observation?_id={obs}", observation(world["other"], "changed")),
        ("DELETE", f"/fhir/Observation/{obs}", None),
        (
            "POST",
            "/fhir",
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "resource": observation(world["own"]),
                        "request": {"method": "POST", "url": "Observation"},
                    }
                ],
            },
        ),
    ]
    for method, path, body in attempts:
        status, answer = await send(client, method, path, "operator", body)
        assert status == 403, (method, path, answer)
    _, bundle = await get(client, "/fhir/Observation", "admin")
    assert bundle["total"] == 7
    # an administrator writes
    status, _ = await send(
        client, "PUT", f"/fhir/Observation/{obs}", "admin", observation(world["other"], "x", id=obs)
    )
    assert status == 200


# -- professionals and the document store -----------------------------------------------------


@pytest.fixture
async def masked(client: Client, world: dict[str, Any]) -> dict[str, str]:
    """A document masked from professionals (MASQUE_PS), authored by "pro": hidden from "pro2"."""
    data = b"<ClinicalDocument>masked</ClinicalDocument>"
    status, answer = await publish(
        client, provide_bundle(document(data=data, labels=(visibility("MASQUE_PS"),)))
    )
    assert status == 200, answer
    doc_id = location_id(answer["entry"][1])
    status, doc = await get(client, f"/fhir/DocumentReference/{doc_id}", "pro")
    assert status == 200
    return {
        "list": location_id(answer["entry"][0]),
        "doc": doc_id,
        "binary": doc["content"][0]["attachment"]["url"].rsplit("/", 1)[1],
    }


async def test_masked_documents_stay_hidden_on_generic_reads_and_includes(
    client: Client, repo: SqliteFhirRepository, masked: dict[str, str]
) -> None:
    assert (await get(client, f"/fhir/DocumentReference/{masked['doc']}", "pro2"))[0] == 404
    assert (await get(client, f"/fhir/Binary/{masked['binary']}", "pro2"))[0] == 404
    # a resource pointing at the document would pull it in through _include
    basic, _ = await repo.create(
        {
            "resourceType": "Basic",
            "code": {"text": "note"},
            "subject": {"reference": f"DocumentReference/{masked['doc']}"},
        }
    )
    query = f"/fhir/Basic?_id={basic['id']}&_include=Basic:subject"
    _, bundle = await get(client, query, "pro2")
    assert ids(bundle) == {basic["id"]} and ids(bundle, "include") == set()
    for who in ("pro", "admin"):  # its author, and an unrestricted caller
        _, bundle = await get(client, query, who)
        assert ids(bundle, "include") == {masked["doc"]}, who
    # the same inside a Bundle's GET entry
    status, answer = await send(client, "POST", "/fhir", "pro2", batch("batch", query.removeprefix("/fhir/")))
    assert status == 200 and ids(answer["entry"][0]["resource"], "include") == set()
    status, answer = await send(client, "POST", "/fhir", "pro", batch("batch", query.removeprefix("/fhir/")))
    assert ids(answer["entry"][0]["resource"], "include") == {masked["doc"]}


async def test_published_lists_and_binaries_change_through_mhd_only(
    client: Client, repo: SqliteFhirRepository, masked: dict[str, str], world: dict[str, Any]
) -> None:
    submission_set = await repo.read("List", masked["list"])
    assert submission_set is not None
    folder = {"resourceType": "List", "status": "current", "mode": "working",
              "code": {"coding": [{"system": MHD_LIST_TYPES, "code": "folder"}]},
              "subject": {"reference": f"Patient/{world['own']}"}}  # fmt: skip
    attempts = [
        ("DELETE", f"/fhir/Binary/{masked['binary']}", None),
        ("PUT", f"/fhir/Binary/{masked['binary']}",
         {"resourceType": "Binary", "id": masked["binary"], "contentType": "text/plain", "data": "eA=="}),
        ("DELETE", f"/fhir/List/{masked['list']}", None),
        ("PUT", f"/fhir/List/{masked['list']}", {**submission_set, "status": "retired"}),
        ("PUT", f"/fhir/List?_id={masked['list']}", {**submission_set, "status": "retired"}),
        ("POST", "/fhir/List", folder),
        ("POST", "/fhir",
         {"resourceType": "Bundle", "type": "batch",
          "entry": [{"request": {"method": "DELETE", "url": f"Binary/{masked['binary']}"}}]}),
    ]  # fmt: skip
    for who in ("pro", "admin"):
        for method, path, body in attempts:
            status, answer = await send(client, method, path, who, body)
            assert status == 405, (who, method, path, answer)
            assert answer["resourceType"] == "OperationOutcome"
    # untouched: the document's bytes are still served, the SubmissionSet unchanged
    resp = await client.get(f"/fhir/Binary/{masked['binary']}", headers=auth("pro"))
    assert resp.status == 200 and await resp.read() == b"<ClinicalDocument>masked</ClinicalDocument>"
    assert await repo.read("List", masked["list"]) == submission_set
    # ordinary Lists, Binaries and other resources stay writable by professionals
    plain = {"resourceType": "List", "status": "current", "mode": "working"}
    assert (await send(client, "PUT", "/fhir/List/plain-1", "pro", plain))[0] == 201
    assert (await send(client, "DELETE", "/fhir/List/plain-1", "pro"))[0] == 200
    binary = {"resourceType": "Binary", "contentType": "text/plain", "data": "eA=="}
    assert (await send(client, "PUT", "/fhir/Binary/plain-2", "pro", binary))[0] == 201
    assert (await send(client, "POST", "/fhir/Observation", "pro", observation(world["own"])))[0] == 201


# -- audit --------------------------------------------------------------------------------------


async def test_scoping_refusals_are_audited(client: Client, audit: AuditLog, world: dict[str, Any]) -> None:
    status, _ = await get(client, f"/fhir/Observation?patient={world['other']}", "patient")
    assert status == 403
    status, _ = await send(client, "DELETE", f"/fhir/Observation/{world['own_obs'][0]}", "operator")
    assert status == 403
    await audit.flush()
    found = [r for _, r in await audit.search(agent=TOKENS["patient"]["subject"])]
    refused = [r for r in found if r["subtype"][0]["code"] == "search-type"]
    assert len(refused) == 1 and refused[0]["outcome"] == "4" and refused[0]["action"] == "E"
    assert refused[0]["agent"][0]["type"]["text"] == "patient"
    found = [r for _, r in await audit.search(agent=TOKENS["operator"]["subject"])]
    deleted = [r for r in found if r["subtype"][0]["code"] == "delete"]
    assert len(deleted) == 1 and deleted[0]["outcome"] == "4"
    assert deleted[0]["entity"][0]["what"]["reference"] == f"Observation/{world['own_obs'][0]}"


async def test_audit_events_are_never_written_through_the_generic_routes(
    client: Client, repo: SqliteFhirRepository
) -> None:
    forged = {
        "resourceType": "AuditEvent",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "recorded": "2026-11-23T10:00:00+01:00",
        "agent": [{"requestor": True, "who": {"display": "nobody"}}],
        "source": {"observer": {"display": "elsewhere"}},
    }
    status, body = await send(client, "POST", "/fhir/AuditEvent", "admin", forged)
    assert status == 405 and body["resourceType"] == "OperationOutcome"
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": forged, "request": {"method": "POST", "url": "AuditEvent"}}],
    }
    status, body = await send(client, "POST", "/fhir", "admin", bundle)
    assert status == 405, body
    assert (await repo.search("AuditEvent", [])).total == 0
