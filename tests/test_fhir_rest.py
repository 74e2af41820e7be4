"""The FHIR REST destination against a real HTTP server on 127.0.0.1 that answers as scripted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from connectors.fhir_rest import FhirRestDestination
from gateway.core.envelope import Envelope
from gateway.core.errors import PermanentDeliveryError, RetryLater
from gateway.core.status import Status
from gateway.hl7.er7 import Message
from gateway.store.merge import CLEAR_URL, WRITE_POLICY_URL
from tests.conftest import wait_for
from tests.mapping.test_adt import A01, MAPPINGS

BUNDLE = orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": []})


class FhirServer:
    def __init__(self) -> None:
        self.plan: list[int] = [200]
        self.requests: list[tuple[str, str, bytes]] = []
        self.searches: list[str] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((request.path, request.headers.get("Authorization", ""), body))
        status = self.plan.pop(0) if len(self.plan) > 1 else self.plan[0]
        if status >= 400:
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "invalid"}],
            }
            headers = {"Retry-After": "0"} if status == 429 else {}
            return web.json_response(outcome, status=status, headers=headers)
        return web.json_response({"resourceType": "Bundle", "type": "transaction-response"}, status=status)

    async def search(self, request: web.Request) -> web.Response:
        """Knows no resource: a merge entry goes on as a plain conditional PUT."""
        self.searches.append(request.path_qs)
        return web.json_response({"resourceType": "Bundle", "type": "searchset", "total": 0})


@pytest.fixture
async def fhir_server() -> AsyncIterator[FhirServer]:
    server = FhirServer()
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", server.handle)
    app.router.add_route("GET", "/{tail:.*}", server.search)
    server.runner = web.AppRunner(app, access_log=None)  # its access log would show the query (an IPP)
    await server.runner.setup()
    site = web.TCPSite(server.runner, "127.0.0.1", 0)
    await site.start()
    server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield server
    await server.runner.cleanup()


def envelope() -> Envelope:
    return Envelope(
        id="01X",
        channel="c",
        source="s",
        raw=b"",
        content_type="application/fhir+json",
        sender="",
        control_id="C1",
        message_type="ADT^A01",
        partition_key="p",
        received_at=0.0,
        trace_id="t",
    )


async def test_2xx_is_sent_with_the_token_from_the_environment(
    fhir_server: FhirServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PASSERELLE_TEST_TOKEN", "s3cret")
    dest = FhirRestDestination(
        "ehr",
        {
            "base_url": f"http://127.0.0.1:{fhir_server.port}/fhir",
            "bearer_token_env": "PASSERELLE_TEST_TOKEN",
        },
    )
    try:
        result = await dest.send(envelope(), BUNDLE)
    finally:
        await dest.aclose()
    assert result.status is Status.SENT
    assert fhir_server.requests == [("/fhir", "Bearer s3cret", BUNDLE)]


@pytest.mark.parametrize("status", [408, 429, 500, 503])
async def test_transient_answers_are_retried(fhir_server: FhirServer, status: int) -> None:
    fhir_server.plan = [status]
    dest = FhirRestDestination("ehr", {"base_url": f"http://127.0.0.1:{fhir_server.port}/fhir"})
    try:
        with pytest.raises(RetryLater):
            await dest.send(envelope(), BUNDLE)
    finally:
        await dest.aclose()


async def test_other_4xx_is_an_error_kept_with_its_outcome(fhir_server: FhirServer) -> None:
    fhir_server.plan = [422]
    dest = FhirRestDestination("ehr", {"base_url": f"http://127.0.0.1:{fhir_server.port}/fhir"})
    try:
        result = await dest.send(envelope(), orjson.dumps({"resourceType": "Patient"}))
    finally:
        await dest.aclose()
    assert result.status is Status.ERROR
    assert result.retry is False
    assert result.response is not None and b"OperationOutcome" in result.response
    assert fhir_server.requests[0][0] == "/fhir/Patient"  # a single resource goes to its type's endpoint


async def test_unreachable_server_and_bad_settings() -> None:
    dest = FhirRestDestination("ehr", {"base_url": "http://127.0.0.1:1/fhir", "timeout_s": 2})
    try:
        with pytest.raises(RetryLater):
            await dest.send(envelope(), BUNDLE)
    finally:
        await dest.aclose()
    missing = FhirRestDestination(
        "ehr", {"base_url": "http://127.0.0.1:1/fhir", "bearer_token_env": "NOT_SET_X"}
    )
    with pytest.raises(PermanentDeliveryError):
        await missing.send(envelope(), BUNDLE)
    await missing.aclose()


async def test_channel_maps_and_posts_with_retries(
    start_gateway, client_for, fhir_server: FhirServer
) -> None:
    fhir_server.plan = [503, 200]
    gw = await start_gateway(
        steps=[{"type": "fhir_mapping", "directory": str(MAPPINGS)}],
        destinations=[
            {
                "name": "ehr",
                "type": "fhir_rest",
                "base_url": f"http://127.0.0.1:{fhir_server.port}/fhir",
                "retry": {"max_attempts": 3, "initial_backoff_s": 0.01},
            }
        ],
    )
    assert Message.decode(await client_for(gw).send(A01.encode())).get("MSA-1") == "AA"
    await wait_for(lambda: len(fhir_server.requests) == 2)
    bundle = orjson.loads(fhir_server.requests[1][2])
    assert bundle["entry"][0]["resource"]["name"][0]["family"] == "GÉRARD"
    assert not [e for e in bundle["entry"] if "extension" in e["request"]]  # ours never leave
    await asyncio.sleep(0.05)
    await gw.store.flush()
    rows = await gw.store.list_messages(
        status="SENT", control_id=None, channel="adt", limit=5, before_seq=None
    )
    assert len(rows) == 1
    trace = await gw.store.get_message(rows[0]["id"], with_payloads=False)
    assert trace is not None
    deliveries = [s for s in trace["stages"] if s["stage"] == "delivery:ehr"]
    assert [s["status"] for s in deliveries] == ["ERROR", "SENT"]
    assert deliveries[1]["content_type"] == "application/fhir+json"


# -- the merge write policy, resolved against the remote server --------------------------------------

IPP = "urn:oid:1.2.250.1.71.4.2.7"
INS = "urn:oid:1.2.250.1.213.1.4.8"
P_CRITERIA = f"Patient?identifier={IPP}|200001"


class RemoteFhir:
    """A FHIR server holding a few Patients: answers identifier searches, records every request."""

    def __init__(self) -> None:
        self.patients: list[dict[str, Any]] = []
        self.search_status = 200
        self.post_status = 200
        self.requests: list[tuple[str, str, str, bytes]] = []  # method, path and query, auth, body
        self.port = 0

    async def search(self, request: web.Request) -> web.Response:
        self.requests.append(
            (request.method, request.path_qs, request.headers.get("Authorization", ""), await request.read())
        )
        if self.search_status != 200:
            return web.json_response({"resourceType": "OperationOutcome"}, status=self.search_status)
        system, _, value = request.query.get("identifier", "").partition("|")
        found = [
            p
            for p in self.patients
            if {"system": system, "value": value} in p.get("identifier", [])
            or p["id"] == request.query.get("_id")
        ]
        return web.json_response(
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "total": len(found),
                "entry": [{"resource": p, "search": {"mode": "match"}} for p in found],
            }
        )

    async def post(self, request: web.Request) -> web.Response:
        self.requests.append(
            (request.method, request.path_qs, request.headers.get("Authorization", ""), await request.read())
        )
        if self.post_status != 200:
            return web.json_response({"resourceType": "OperationOutcome"}, status=self.post_status)
        return web.json_response({"resourceType": "Bundle", "type": "transaction-response"})

    def posted(self) -> dict[str, Any]:
        posts = [body for method, _, _, body in self.requests if method == "POST"]
        assert len(posts) == 1
        data: dict[str, Any] = orjson.loads(posts[0])
        return data


@pytest.fixture
async def remote_fhir() -> AsyncIterator[RemoteFhir]:
    server = RemoteFhir()
    app = web.Application()
    app.router.add_route("GET", "/fhir/{type}", server.search)
    app.router.add_route("POST", "/fhir", server.post)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield server
    await runner.cleanup()


def remote_patient(id_: str = "r1", version: str = "3") -> dict[str, Any]:
    """What an earlier ADT left on the remote server."""
    return {
        "resourceType": "Patient",
        "id": id_,
        "meta": {"versionId": version, "lastUpdated": "2024-05-14T08:30:00Z"},
        "identifier": [{"system": IPP, "value": "200001"}, {"system": INS, "value": "2840775123456"}],
        "name": [{"family": "Lefèvre"}],
        "telecom": [{"system": "phone", "value": "0102030405"}],
        "birthDate": "1984-07-07",
    }


def merge_bundle(kind: str = "transaction", url: str = P_CRITERIA) -> dict[str, Any]:
    """An ORU's Bundle: a thin Patient merged (its phone nulled), an Observation about it."""
    return {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {
                "fullUrl": "urn:uuid:pat",
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": IPP, "value": "200001"}],
                    "name": [{"family": "Lefèvre-Martin"}],
                },
                "request": {
                    "method": "PUT",
                    "url": url,
                    "extension": [
                        {"url": WRITE_POLICY_URL, "valueCode": "merge"},
                        {"url": CLEAR_URL, "valueString": "telecom"},
                    ],
                },
            },
            {
                "resource": {"resourceType": "Observation", "subject": {"reference": "urn:uuid:pat"}},
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }


async def send_to(remote: RemoteFhir, payload: dict[str, Any], settings: dict[str, Any] | None = None) -> Any:
    dest = FhirRestDestination(
        "ehr", {"base_url": f"http://127.0.0.1:{remote.port}/fhir", **(settings or {})}
    )
    try:
        return await dest.send(envelope(), orjson.dumps(payload))
    finally:
        await dest.aclose()


async def test_merge_entry_becomes_a_put_of_the_merged_resource_guarded_by_if_match(
    remote_fhir: RemoteFhir, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PASSERELLE_TEST_TOKEN", "s3cret")
    remote_fhir.patients = [remote_patient()]
    sent = merge_bundle()
    result = await send_to(remote_fhir, sent, {"bearer_token_env": "PASSERELLE_TEST_TOKEN"})
    assert result.status is Status.SENT
    (search, post) = remote_fhir.requests
    assert search[0] == "GET" and search[2] == post[2] == "Bearer s3cret"
    assert search[1] == "/fhir/Patient?identifier=urn:oid:1.2.250.1.71.4.2.7%7C200001&_count=2"
    posted = remote_fhir.posted()
    patient = posted["entry"][0]
    assert patient["fullUrl"] == "urn:uuid:pat"  # the Observation's reference still resolves
    assert patient["request"] == {"method": "PUT", "url": "Patient/r1", "ifMatch": 'W/"3"'}
    assert patient["resource"] == {
        "resourceType": "Patient",
        "id": "r1",
        "identifier": [{"system": IPP, "value": "200001"}, {"system": INS, "value": "2840775123456"}],
        "name": [{"family": "Lefèvre-Martin"}],
        "birthDate": "1984-07-07",
    }
    assert posted["entry"][1] == sent["entry"][1]


async def test_merge_entry_by_id_searches_the_id(remote_fhir: RemoteFhir) -> None:
    remote_fhir.patients = [remote_patient(id_="r7", version="12")]
    await send_to(remote_fhir, merge_bundle(url="Patient/r7"))
    assert remote_fhir.requests[0][1] == "/fhir/Patient?_id=r7&_count=2"
    assert remote_fhir.posted()["entry"][0]["request"] == {
        "method": "PUT",
        "url": "Patient/r7",
        "ifMatch": 'W/"12"',
    }


async def test_merge_entry_matching_nothing_goes_as_a_plain_conditional_put(remote_fhir: RemoteFhir) -> None:
    sent = merge_bundle()
    result = await send_to(remote_fhir, sent)
    assert result.status is Status.SENT
    patient = remote_fhir.posted()["entry"][0]
    assert patient["request"] == {"method": "PUT", "url": P_CRITERIA}
    assert patient["resource"] == sent["entry"][0]["resource"]


async def test_ambiguous_merge_identity_is_a_permanent_error_naming_the_type(remote_fhir: RemoteFhir) -> None:
    remote_fhir.patients = [remote_patient("r1"), remote_patient("r2")]
    with pytest.raises(PermanentDeliveryError, match="Patient"):
        await send_to(remote_fhir, merge_bundle())
    assert [r[0] for r in remote_fhir.requests] == ["GET"]  # nothing posted


@pytest.mark.parametrize("status", [409, 412])
async def test_a_resource_changed_meanwhile_is_retried_after_a_merge(
    remote_fhir: RemoteFhir, status: int
) -> None:
    remote_fhir.patients = [remote_patient()]
    remote_fhir.post_status = status
    with pytest.raises(RetryLater):
        await send_to(remote_fhir, merge_bundle())
    # Without merge entries the answer is what it always was: an error, not retried.
    remote_fhir.requests.clear()
    plain = merge_bundle()
    del plain["entry"][0]["request"]["extension"]
    result = await send_to(remote_fhir, plain)
    assert result.status is Status.ERROR and result.retry is False


async def test_search_failures_before_a_merge_are_retried(remote_fhir: RemoteFhir) -> None:
    remote_fhir.search_status = 503
    with pytest.raises(RetryLater):
        await send_to(remote_fhir, merge_bundle())
    unreachable = FhirRestDestination("ehr", {"base_url": "http://127.0.0.1:1/fhir", "timeout_s": 2})
    try:
        with pytest.raises(RetryLater):
            await unreachable.send(envelope(), orjson.dumps(merge_bundle()))
    finally:
        await unreachable.aclose()
    remote_fhir.search_status = 400
    with pytest.raises(PermanentDeliveryError):
        await send_to(remote_fhir, merge_bundle())
    assert not [r for r in remote_fhir.requests if r[0] == "POST"]


async def test_bundle_without_merge_entries_is_sent_without_our_extensions(remote_fhir: RemoteFhir) -> None:
    bundle = merge_bundle()
    bundle["entry"][0]["request"]["extension"] = [
        {"url": WRITE_POLICY_URL, "valueCode": "replace"},
        {"url": "urn:someone-else", "valueString": "x"},
    ]
    await send_to(remote_fhir, bundle)
    assert [r[0] for r in remote_fhir.requests] == ["POST"]
    # a replace needs no read; the server gets the Bundle as it was, less our private extensions
    bundle["entry"][0]["request"]["extension"] = [{"url": "urn:someone-else", "valueString": "x"}]
    assert remote_fhir.requests[0][3] == orjson.dumps(bundle)


async def test_bundle_without_any_of_our_extensions_is_sent_byte_for_byte(remote_fhir: RemoteFhir) -> None:
    bundle = merge_bundle()
    del bundle["entry"][0]["request"]["extension"]
    await send_to(remote_fhir, bundle)
    assert remote_fhir.requests[0][3] == orjson.dumps(bundle)


async def test_merge_entries_outside_a_transaction_are_refused(remote_fhir: RemoteFhir) -> None:
    with pytest.raises(PermanentDeliveryError, match="transaction"):
        await send_to(remote_fhir, merge_bundle(kind="batch"))
    bad = merge_bundle()
    bad["entry"][0]["request"]["extension"][0]["valueCode"] = "upsert"
    with pytest.raises(PermanentDeliveryError, match="write-policy"):
        await send_to(remote_fhir, bad)
    assert remote_fhir.requests == []
