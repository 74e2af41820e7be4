"""The live FHIR document server suite: ITI-65 / ITI-67 / ITI-68 and the DMP metadata updates.

Each case publishes its own documents (fresh identifiers, bytes and SHA-1), so cases neither
depend on each other nor collide with earlier runs. Every Bundle sent is first checked against
the PDSm ITI-65 profile shipped in profiles/, so a failure points at the server, not the suite.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any
from urllib.parse import urlencode, urljoin

import orjson

from conformance.fhir.registry import Registry
from conformance.report import CaseResult, Step, SuiteResult, show_json, show_query
from conformance.suite import Case, Suite, SuiteError

PDSM = "https://interop.esante.gouv.fr/ig/fhir/pdsm/StructureDefinition/"
BUNDLE_PROFILE = PDSM + "pdsm-comprehensive-provide-document-bundle"
TRE_A07 = (
    "https://mos.esante.gouv.fr/NOS/TRE_A07-StatutVisibiliteDocument/FHIR/TRE-A07-StatutVisibiliteDocument"
)
CONFIDENTIALITY = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
IS_ARCHIVED = PDSM + "pdsm-ext-is-archived"
JSON_PATCH = "application/json-patch+json"


def _sha1(data: bytes) -> str:
    import hashlib

    return base64.b64encode(hashlib.sha1(data, usedforsecurity=False).digest()).decode()


class _Doc:
    """One document of a case: its bytes, identifiers and, once published, its server id."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.unique = f"urn:oid:1.2.250.1.999.1.{uuid.uuid4().int % 10**12}"
        self.data = f"Compte rendu de test {name} {uuid.uuid4()}\n".encode()
        self.id: str | None = None
        self.binary_url: str | None = None


def build_iti65(
    patient: dict[str, str], doc: _Doc, *, replaces: _Doc | None = None, bad_hash: bool = False
) -> dict[str, Any]:
    """An ITI-65 transaction Bundle for one document (PDSm comprehensive metadata)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    binary_url = f"urn:uuid:{uuid.uuid4()}"
    docref_url = f"urn:uuid:{uuid.uuid4()}"
    list_url = f"urn:uuid:{uuid.uuid4()}"
    contained_patient = {"resourceType": "Patient", "id": "pat", "identifier": [patient]}
    author = {
        "resourceType": "Practitioner",
        "id": "author",
        "identifier": [{"system": "urn:oid:1.2.250.1.71.4.2.1", "value": "810000000001"}],
    }
    digest = _sha1(b"not the document" if bad_hash else doc.data)
    docref: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "meta": {"profile": [PDSM + "pdsm-comprehensive-document-reference"]},
        "contained": [contained_patient, author],
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": doc.unique},
        "identifier": [
            {"use": "official", "system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{uuid.uuid4()}"}
        ],
        "status": "current",
        "type": {
            "coding": [{"system": "http://loinc.org", "code": "11488-4", "display": "Consultation note"}]
        },
        "category": [
            {"coding": [{"system": "urn:oid:1.2.250.1.213.1.1.4.1", "code": "10", "display": "Compte rendu"}]}
        ],
        "subject": {"identifier": patient},
        "date": now,
        "author": [{"reference": "#author"}],
        "custodian": {"identifier": {"system": "urn:oid:1.2.250.1.71.4.2.2", "value": "1000000001"}},
        "securityLabel": [{"coding": [{"system": CONFIDENTIALITY, "code": "N"}]}],
        "content": [
            {
                "attachment": {
                    "contentType": "text/plain",
                    "language": "fr-FR",
                    "url": binary_url,
                    "size": len(doc.data),
                    "hash": digest,
                    "title": f"Compte rendu {doc.name}",
                    "creation": now,
                },
                "format": {
                    "system": "urn:oid:1.3.6.1.4.1.19376.1.2.3",
                    "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient",
                },
            }
        ],
        "context": {
            "period": {"start": now},
            "facilityType": {"coding": [{"system": "urn:oid:1.2.250.1.71.4.2.4", "code": "SA01"}]},
            "practiceSetting": {
                "coding": [{"system": "urn:oid:1.2.250.1.213.1.1.4.9", "code": "ETABLISSEMENT"}]
            },
        },
    }
    entries: list[dict[str, Any]] = []
    if replaces is not None and replaces.id:
        docref["relatesTo"] = [
            {"code": "replaces", "target": {"reference": f"DocumentReference/{replaces.id}"}}
        ]
    submission = {
        "resourceType": "List",
        "meta": {"profile": [PDSM + "pdsm-comprehensive-submissionset"]},
        "contained": [contained_patient, author],
        "extension": [
            {
                "url": "https://profiles.ihe.net/ITI/MHD/StructureDefinition/ihe-designationType",
                "valueCodeableConcept": {
                    "coding": [{"system": "urn:oid:1.2.250.1.71.4.2.4", "code": "SA01"}]
                },
            },
            {
                "url": "https://profiles.ihe.net/ITI/MHD/StructureDefinition/ihe-sourceId",
                "valueIdentifier": {"value": "urn:oid:1.2.250.1.999.2"},
            },
        ],
        "identifier": [
            {
                "use": "usual",
                "system": "urn:ietf:rfc:3986",
                "value": f"urn:oid:1.2.250.1.999.3.{uuid.uuid4().int % 10**12}",
            }
        ],
        "status": "current",
        "mode": "working",
        "code": {
            "coding": [
                {
                    "system": "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes",
                    "code": "submissionset",
                }
            ]
        },
        "subject": {"identifier": patient},
        "date": now,
        "source": {"reference": "#author"},
        "entry": [{"item": {"reference": docref_url}}],
    }
    entries.append(
        {"fullUrl": list_url, "resource": submission, "request": {"method": "POST", "url": "List"}}
    )
    entries.append(
        {"fullUrl": docref_url, "resource": docref, "request": {"method": "POST", "url": "DocumentReference"}}
    )
    entries.append(
        {
            "fullUrl": binary_url,
            "resource": {
                "resourceType": "Binary",
                "contentType": "text/plain",
                "data": base64.b64encode(doc.data).decode(),
            },
            "request": {"method": "POST", "url": "Binary"},
        }
    )
    if replaces is not None and replaces.id:
        patch = [{"op": "replace", "path": "/status", "value": "superseded"}]
        entries.append(
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "Binary",
                    "contentType": JSON_PATCH,
                    "data": base64.b64encode(orjson.dumps(patch)).decode(),
                },
                "request": {"method": "PATCH", "url": f"DocumentReference/{replaces.id}"},
            }
        )
    return {
        "resourceType": "Bundle",
        "meta": {"profile": [BUNDLE_PROFILE]},
        "type": "transaction",
        "entry": entries,
    }


async def run_document_server(
    suite: Suite,
    target: str,
    result: SuiteResult,
    registry: Registry,
    progress: Any,
    *,
    token: str | None,
    timeout: float,
    reveal: bool = False,
) -> None:
    import aiohttp

    if not target.startswith(("http://", "https://")):
        raise SuiteError(f"expected http(s)://HOST/fhir, got {target!r}")
    base = target.rstrip("/") + "/"
    patient = dict(suite.settings.get("patient") or {})
    if not patient.get("system") or not patient.get("value"):
        raise SuiteError(f"{suite.path}: key 'patient': system and value required")
    headers = {"Accept": "application/fhir+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession(
        headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:
        if suite.settings.get("create_patient"):
            result.cases.append(await _create_patient(session, base, patient))
        for done, case in enumerate(suite.cases, 1):
            started = time.monotonic()
            outcome = CaseResult(case.id, case.title)
            runner = _CaseRun(session, base, patient, registry, outcome, reveal=reveal, timeout=timeout)
            try:
                await runner.run(case)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome.fail("HTTP", "connection", f"request failed: {type(exc).__name__}: {exc}")
            outcome.seconds = time.monotonic() - started
            result.cases.append(outcome)
            progress(done, len(suite.cases), case.id)


async def _create_patient(session: Any, base: str, patient: dict[str, str]) -> CaseResult:
    """Setup: the document server must know the patient; conditional create, so reruns reuse it."""
    import aiohttp

    case = CaseResult("setup-patient", "The suite's patient exists on the server (conditional create)")
    resource = {
        "resourceType": "Patient",
        "identifier": [{"use": "official", "system": patient["system"], "value": patient["value"]}],
        "name": [{"use": "official", "family": "TEST-CONFORMITE", "given": ["Lucie"]}],
        "gender": "female",
        "birthDate": "1982-03-17",
    }
    headers = {
        "Content-Type": "application/fhir+json",
        "If-None-Exist": f"identifier={patient['system']}|{patient['value']}",
    }
    try:
        async with session.post(
            urljoin(base, "Patient"), data=orjson.dumps(resource), headers=headers
        ) as resp:
            case.expect(
                resp.status in (200, 201), "HTTP-STATUS", "setup", f"HTTP {resp.status} creating the patient"
            )
    except (aiohttp.ClientError, TimeoutError) as exc:
        case.fail("HTTP", "setup", f"request failed: {type(exc).__name__}: {exc}")
    return case


class _CaseRun:
    def __init__(
        self,
        session: Any,
        base: str,
        patient: dict[str, str],
        registry: Registry,
        case: CaseResult,
        *,
        reveal: bool = False,
        timeout: float | None = None,
    ) -> None:
        self.session = session
        self.base = base
        self.patient = patient
        self.registry = registry
        self.case = case
        self.docs: dict[str, _Doc] = {}
        self.reveal = reveal
        self.timeout = timeout
        self.sent: str | None = None  # the last request, as the reports show it

    def doc(self, name: str) -> _Doc:
        return self.docs.setdefault(name, _Doc(name))

    async def run(self, case: Case) -> None:
        for number, step in enumerate(case.steps, 1):
            where = f"step {number}"
            expect = step.get("expect") or {}
            action = next((k for k in ("publish", "search", "retrieve", "read", "update") if k in step), None)
            if action is None:
                raise SuiteError(
                    f"{case.id} step {number}: no action (publish, search, retrieve, read, update)"
                )
            args = step[action] or {}
            since, started = len(self.case.assertions), time.monotonic()
            status, body, raw = await getattr(self, action)(args, where)
            self._check(where, action, args, expect, status, body, raw)
            answer = show_json(body, reveal=self.reveal) if body is not None else f"{len(raw)} bytes"
            self.case.add_step(
                Step(
                    where,
                    f"{action} {args.get('document', '')}".strip(),
                    "fhir",
                    sent=self.sent,
                    received=f"HTTP {status}\n{answer}",
                    timeout=self.timeout,
                    seconds=time.monotonic() - started,
                ),
                since,
            )

    async def _call(self, method: str, url: str, **kw: Any) -> tuple[int, Any, bytes]:
        data = kw.get("data") or b""
        try:
            shown = show_json(orjson.loads(data), reveal=self.reveal) if data else ""
        except orjson.JSONDecodeError:
            shown = f"{len(data)} bytes"
        # the query's values are hidden when masked: only the path and the parameter names show
        path, _, query = url.partition("?")
        params = [(name, value) for name, _, value in (p.partition("=") for p in query.split("&") if p)]
        where = path + ("?" + show_query(params, reveal=self.reveal) if params else "")
        self.sent = f"{method} {where}" + (f"\n{shown}" if shown else "")
        async with self.session.request(method, url, **kw) as resp:
            raw = await resp.read()
            try:
                body = orjson.loads(raw) if raw and "json" in (resp.content_type or "") else None
            except orjson.JSONDecodeError:
                body = None
            return resp.status, body, raw

    async def publish(self, args: dict[str, Any], where: str) -> tuple[int, Any, bytes]:
        doc = self.doc(str(args["document"]))
        replaces = self.doc(str(args["replaces"])) if args.get("replaces") else None
        bundle = build_iti65(self.patient, doc, replaces=replaces, bad_hash=bool(args.get("bad_hash")))
        if not args.get("bad_hash"):
            # The suite's own Bundle must conform, or a refusal would prove nothing about the server.
            findings = self.registry.validate(bundle, base=False)
            self.case.findings(findings, "ITI-65-BUNDLE", where, "the ITI-65 Bundle sent")
        status, body, raw = await self._call(
            "POST",
            self.base.rstrip("/"),
            data=orjson.dumps(bundle),
            headers={"Content-Type": "application/fhir+json"},
        )
        if status == 200 and isinstance(body, dict):
            for entry in body.get("entry") or []:
                location = str((entry.get("response") or {}).get("location", ""))
                parts = location.split("/")
                if "DocumentReference" in parts:
                    doc.id = parts[parts.index("DocumentReference") + 1]
                elif "Binary" in parts:
                    doc.binary_url = location.split("/_history", 1)[0]
        return status, body, raw

    async def search(self, args: dict[str, Any], where: str) -> tuple[int, Any, bytes]:
        params: dict[str, str] = {}
        if args.get("patient"):
            params["patient.identifier"] = f"{self.patient['system']}|{self.patient['value']}"
        if args.get("status"):
            params["status"] = str(args["status"])
        return await self._call("GET", urljoin(self.base, "DocumentReference") + "?" + urlencode(params))

    async def read(self, args: dict[str, Any], where: str) -> tuple[int, Any, bytes]:
        doc = self.doc(str(args["document"]))
        return await self._call("GET", urljoin(self.base, f"DocumentReference/{doc.id}"))

    async def retrieve(self, args: dict[str, Any], where: str) -> tuple[int, Any, bytes]:
        doc = self.doc(str(args["document"]))
        _status, body, _ = await self.read(args, where)
        url = None
        if isinstance(body, dict):
            url = ((body.get("content") or [{}])[0].get("attachment") or {}).get("url")
        url = url or doc.binary_url
        if not url:
            return 0, None, b""
        async with self.session.get(urljoin(self.base, url), headers={"Accept": "*/*"}) as resp:
            return resp.status, None, await resp.read()

    async def update(self, args: dict[str, Any], where: str) -> tuple[int, Any, bytes]:
        doc = self.doc(str(args["document"]))
        ops: list[dict[str, Any]] = []
        if "security" in args:
            code = str(args["security"])
            system = CONFIDENTIALITY if code == "N" else TRE_A07
            ops.append(
                {
                    "op": "replace",
                    "path": "/securityLabel",
                    "value": [{"coding": [{"system": system, "code": code}]}],
                }
            )
        if "archived" in args:
            _, current, _ = await self.read(args, where)
            extensions = [e for e in (current or {}).get("extension", []) if e.get("url") != IS_ARCHIVED]
            extensions.append({"url": IS_ARCHIVED, "valueBoolean": bool(args["archived"])})
            ops.append({"op": "add", "path": "/extension", "value": extensions})
        return await self._call(
            "PATCH",
            urljoin(self.base, f"DocumentReference/{doc.id}"),
            data=orjson.dumps(ops),
            headers={"Content-Type": JSON_PATCH},
        )

    def _check(
        self,
        where: str,
        action: str,
        args: dict[str, Any],
        expect: dict[str, Any],
        status: int,
        body: Any,
        raw: bytes,
    ) -> None:
        case = self.case
        wanted = [int(s) for s in expect.get("status", [200])]
        why = ""
        if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
            issues = body.get("issue") or [{}]
            why = "; ".join(
                f"{i.get('diagnostics', '')} at {','.join(i.get('expression') or [])}" for i in issues[:3]
            )
        shown = f"HTTP {status}; expected {'/'.join(map(str, wanted))}" + (
            f" ({why})" if why and status not in wanted else ""
        )
        case.expect(status in wanted, "HTTP-STATUS", f"{where} {action}", shown)
        if expect.get("outcome"):
            case.expect(
                isinstance(body, dict)
                and body.get("resourceType") == "OperationOutcome"
                and bool(body.get("issue")),
                "HTTP-OUTCOME",
                f"{where} {action}",
                "the error is explained by an OperationOutcome",
            )
        if expect.get("response_entries"):
            ok = (
                isinstance(body, dict)
                and body.get("type") == "transaction-response"
                and all("response" in e for e in body.get("entry") or [{}])
            )
            case.expect(
                ok, "ITI-65-RESPONSE", f"{where} {action}", "a transaction-response, one response per entry"
            )
        if "found" in expect:
            doc = self.doc(str(args["find"]))
            found = 0
            if isinstance(body, dict):
                for entry in body.get("entry") or []:
                    resource = entry.get("resource") or {}
                    if (resource.get("masterIdentifier") or {}).get("value") == doc.unique:
                        found += 1
            case.expect(
                found == int(expect["found"]),
                "ITI-67-FOUND",
                f"{where} {action}",
                f"document {doc.name} found {found} time(s)",
            )
        if expect.get("same_bytes"):
            doc = self.doc(str(args["document"]))
            case.expect(
                raw == doc.data,
                "ITI-68-BYTES",
                f"{where} {action}",
                "the bytes retrieved are the bytes published",
            )
        if "doc_status" in expect:
            got = body.get("status") if isinstance(body, dict) else None
            case.expect(
                got == expect["doc_status"],
                "DOC-STATUS",
                f"{where} {action}",
                f"status is {got}; expected {expect['doc_status']}",
            )
        labels = [
            c.get("code")
            for label in ((body or {}).get("securityLabel") or [] if isinstance(body, dict) else [])
            for c in label.get("coding") or []
        ]
        if "has_security" in expect:
            case.expect(
                expect["has_security"] in labels,
                "DOC-SECURITY",
                f"{where} {action}",
                f"securityLabel holds {expect['has_security']}",
            )
        if "lacks_security" in expect:
            case.expect(
                expect["lacks_security"] not in labels,
                "DOC-SECURITY",
                f"{where} {action}",
                f"securityLabel no longer holds {expect['lacks_security']}",
            )
        if "archived" in expect:
            flags = (
                [
                    e.get("valueBoolean")
                    for e in ((body or {}).get("extension") or [])
                    if isinstance(e, dict) and e.get("url") == IS_ARCHIVED
                ]
                if isinstance(body, dict)
                else []
            )
            case.expect(
                flags == [expect["archived"]],
                "DOC-ARCHIVED",
                f"{where} {action}",
                f"isArchived is {expect['archived']}",
            )
