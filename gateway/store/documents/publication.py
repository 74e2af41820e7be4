"""Publication (ITI-65, ITI-105, the HL7v2 feed): one transaction Bundle checked against the DMP's
rules and written in one write of the repository, its documents indexed, the documents it
replaces superseded, its PATCH and DELETE entries applied as metadata updates."""

from __future__ import annotations

import base64
import binascii
import http
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl

import orjson

from gateway.core.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PasserelleError,
    Unprocessable,
)
from gateway.fhir.outcome import outcome
from gateway.fhir.resource import ID_RE
from gateway.fhir.search import criteria
from gateway.store import fhir_common as common
from gateway.store.documents.access import allowed_patients, check_author, check_metadata_rights, visible
from gateway.store.documents.blobs import BINARY_URL, Blob, decode_base64
from gateway.store.documents.model import (
    FEED,
    IS_ARCHIVED,
    MHD_LIST_TYPES,
    STATUSES,
    URI_SYSTEM,
    Actor,
    Mode,
    split_identifier,
)
from gateway.store.documents.ops import (
    DocOps,
    identifier_patients,
    index_document,
    known_blob,
    mask_of,
    one_document,
    patient_of,
)
from gateway.store.documents.patches import apply_json_patch, check_metadata_update, fhirpath_patch
from gateway.store.documents.valuesets import ValueSets, coded_elements, codings


class StoreSettings(Protocol):
    """What a publication needs of the store it runs for."""

    mode: Mode
    valuesets: ValueSets
    # The check every written resource passes; run on what a metadata update makes.
    validator: Callable[[Mapping[str, Any]], None] | None


def _issue(severity: str, code: str, text: str, where: str) -> dict[str, Any]:
    return {"severity": severity, "code": code, "diagnostics": text, "expression": [where]}


def _at(exc: PasserelleError, index: int) -> PasserelleError:
    """Name the failing entry (and the element in it), keeping the error's class and status."""
    where = f"Bundle.entry[{index}]"
    loc = exc.location
    if not loc:
        exc.location = where
    elif loc.startswith(("request", "resource")):
        exc.location = f"{where}.{loc}"
    elif not loc.startswith("Bundle."):
        exc.location = f"{where}.resource.{loc}"
    if not exc.message.startswith(where):
        exc.message = f"{where}: {exc.message}"
        exc.args = (exc.message,)
    return exc


def _response(status: int, type_: str, stored: Mapping[str, Any]) -> dict[str, Any]:
    version = stored["meta"]["versionId"]
    return {
        "response": {
            "status": f"{status} {http.HTTPStatus(status).phrase}",
            "location": f"{type_}/{stored['id']}/_history/{version}",
            "etag": f'W/"{version}"',
            "lastModified": stored["meta"]["lastUpdated"],
        }
    }


def _is_submission_set(resource: Any) -> bool:
    if not isinstance(resource, dict) or resource.get("resourceType") != "List":
        return False
    return any(
        c.get("system") == MHD_LIST_TYPES and c.get("code") == "submissionset"
        for c in codings(resource.get("code"))
    )


def submission_set(
    patient_ref: Mapping[str, Any], items: Sequence[str], *, identifier: str, date: str
) -> dict[str, Any]:
    """A SubmissionSet List for documents that came without one (ITI-105, the HL7v2 feed)."""
    return {
        "resourceType": "List",
        "identifier": [{"system": URI_SYSTEM, "value": identifier}],
        "status": "current",
        "mode": "working",
        "code": {"coding": [{"system": MHD_LIST_TYPES, "code": "submissionset"}]},
        "subject": dict(patient_ref),
        "date": date,
        "entry": [{"item": {"reference": url}} for url in items],
    }


def with_submission_set(bundle: Mapping[str, Any], identifier: str, date: str) -> dict[str, Any]:
    """The Bundle with a SubmissionSet List added when it has none (its documents listed)."""
    entries = list(bundle.get("entry") or ())
    if any(_is_submission_set((e or {}).get("resource")) for e in entries if isinstance(e, dict)):
        return dict(bundle)
    docs = [
        e
        for e in entries
        if isinstance(e, dict) and (e.get("resource") or {}).get("resourceType") == "DocumentReference"
    ]
    if not docs:
        return dict(bundle)
    items = []
    for e in docs:
        url = e.get("fullUrl")
        if not isinstance(url, str):
            url = f"urn:uuid:{new_uuid()}"
            e["fullUrl"] = url
        items.append(url)
    subject = docs[0]["resource"].get("subject") or {}
    list_entry = {
        "fullUrl": f"urn:uuid:{new_uuid()}",
        "resource": submission_set(subject, items, identifier=identifier, date=date),
        # Conditional: a replayed message does not make a second SubmissionSet.
        "request": {"method": "POST", "url": "List", "ifNoneExist": f"identifier={URI_SYSTEM}|{identifier}"},
    }
    return {**bundle, "entry": [list_entry, *entries]}


def new_uuid() -> str:
    """A random UUID as text (the urn:uuid fullUrls and identifiers the store makes)."""
    return str(uuid.uuid4())


@dataclass(slots=True)
class _Special:
    """A PATCH or DELETE entry on a DocumentReference: done by the store, after the writes."""

    method: str
    url: str
    patch: Callable[[dict[str, Any]], dict[str, Any]] | None = None


class Publication:
    """One ITI-65 transaction, inside one write of the repository (``tx``; ``ops`` on the same
    connection)."""

    def __init__(self, store: StoreSettings, tx: common.Transaction, ops: DocOps, actor: Actor) -> None:
        self.store = store
        self.tx = tx
        self.ops = ops
        self.actor = actor
        self.blobs: list[Blob] = []
        self.inline: list[Blob] = []  # attachment.data: a Binary is made for them
        self.by_url: dict[str, Blob] = {}
        self.specials: dict[int, _Special] = {}
        self.replaces: list[tuple[int, str]] = []  # (entry, replaced document id)
        self.deletes: set[int] = set()  # entries whose document update is a logical delete
        self.issues: dict[int, list[dict[str, Any]]] = {}

    # The whole transaction.
    async def run(self, bundle: Mapping[str, Any], *, need_submission_set: bool = True) -> dict[str, Any]:
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            raise BadRequest("ITI-65 takes a transaction Bundle", location="Bundle.type")
        entries = bundle.get("entry")
        if not isinstance(entries, list) or not entries:
            raise BadRequest("the Bundle has no entry", location="Bundle.entry")
        if self.actor.patients is not None:
            for i, entry in enumerate(entries):
                try:
                    await self._within_own_record(entry)
                except PasserelleError as exc:
                    raise _at(exc, i) from None
        prepared = [self._prepare(i, e) for i, e in enumerate(entries)]
        sets = sum(1 for e in prepared if _is_submission_set(e.get("resource")))
        if need_submission_set and sets != 1:
            raise Unprocessable(
                f"an ITI-65 Bundle carries exactly one SubmissionSet List (found {sets})",
                location="Bundle.entry",
            )
        patients = self._bundle_patients(prepared)
        for i, entry in enumerate(prepared):
            resource = entry.get("resource")
            if isinstance(resource, dict) and resource.get("resourceType") == "DocumentReference":
                try:
                    await self._check_document(i, entry, patients)
                except PasserelleError as exc:
                    raise _at(exc, i) from None
            if isinstance(resource, dict):
                try:
                    await self._resolve_conditional_refs(resource, patients)
                except PasserelleError as exc:
                    raise _at(exc, i) from None
        if self.actor.patients is not None:
            await self._resolved_within_own_record(prepared)
        answer = await common.process_bundle(self.tx, {**bundle, "entry": prepared})
        results: list[dict[str, Any]] = answer["entry"]
        await self._after(prepared, results)
        for i, issues in self.issues.items():
            if issues:
                results[i]["response"]["outcome"] = outcome(*issues)
        return answer

    # A patient publishes to their own record (DMP): new documents, their bytes and their
    # SubmissionSet, for a patient they may see; nothing else of the repository.
    async def _within_own_record(self, entry: Any) -> None:
        """Before any lookup, so that a refusal says nothing of whether another patient exists."""
        if not isinstance(entry, dict):
            return  # the repository reports it with its index
        request = entry.get("request")
        method = request.get("method") if isinstance(request, dict) else None
        resource = entry.get("resource")
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        if not isinstance(resource, dict) or method != "POST" or rtype not in ("DocumentReference", "List"):
            if not (rtype == "Binary" and method in ("POST", "PUT")):
                raise Forbidden(
                    "a patient publishes new documents (DocumentReference, Binary, List) only",
                    location="request",
                )
            return
        if rtype == "DocumentReference" and any(
            isinstance(rel, dict) and rel.get("code") == "replaces" for rel in resource.get("relatesTo") or ()
        ):
            raise Forbidden("a patient does not replace documents", location="resource.relatesTo")
        if not await self._own_subject(resource.get("subject")):
            raise Forbidden("a patient publishes to their own record only", location="resource.subject")

    async def _own_subject(self, subject: Any) -> bool:
        assert self.actor.patients is not None
        mine = [split_identifier(p) for p in self.actor.patients]

        def allowed(system: str | None, value: str) -> bool:
            return any(value == v and (system is None or system == s) for s, v in mine)

        if not isinstance(subject, dict):
            return True  # missing: the document checks answer 422
        ref = subject.get("reference")
        if isinstance(ref, str) and ref.startswith("Patient?"):
            params = parse_qsl(ref.partition("?")[2])
            return bool(params) and all(
                k == "identifier" and allowed(*split_identifier(v)) for k, v in params
            )
        if isinstance(ref, str):
            return ref in (await allowed_patients(self.ops, self.actor) or set())
        ident = subject.get("identifier")
        if isinstance(ident, dict):
            return allowed(ident.get("system"), str(ident.get("value", "")))
        return True  # no patient named: the document checks answer 422

    async def _resolved_within_own_record(self, entries: list[Any]) -> None:
        """After resolution: every subject is one of the patient's own records."""
        allowed = await allowed_patients(self.ops, self.actor) or set()
        for i, entry in enumerate(entries):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict) and resource.get("resourceType") in ("DocumentReference", "List"):
                ref = (resource.get("subject") or {}).get("reference")
                if ref not in allowed:
                    raise _at(
                        Forbidden(
                            "a patient publishes to their own record only", location="resource.subject"
                        ),
                        i,
                    )

    def _prepare(self, i: int, raw: Any) -> dict[str, Any]:
        if not isinstance(raw, dict):
            return raw  # type: ignore[no-any-return]  # the repository reports it with its index
        request: dict[str, Any] = raw["request"] if isinstance(raw.get("request"), dict) else {}
        method, url = request.get("method"), request.get("url")
        resource = raw.get("resource")
        if isinstance(url, str) and url.startswith("DocumentReference") and method in ("PATCH", "DELETE"):
            special = _Special(str(method), url)
            if method == "PATCH":
                special.patch = self._patch_fn(i, resource)
            self.specials[i] = special
            # A read in its place keeps the entry indexes (and fails there if the target is absent).
            return {"request": {"method": "GET", "url": url}}
        if method == "PATCH":
            raise _at(MethodNotAllowed("PATCH applies to DocumentReference only"), i)
        entry = dict(raw)
        if (
            isinstance(resource, dict)
            and resource.get("resourceType") == "Binary"
            and method in ("POST", "PUT")
        ):
            if "data" in resource:
                try:
                    data = decode_base64(resource["data"], "Binary.data")
                except PasserelleError as exc:
                    raise _at(exc, i) from None
                blob = Blob(data, resource.get("contentType"))
                given = (
                    url.split("/", 1)[1] if method == "PUT" and isinstance(url, str) and "/" in url else None
                )
                # Content-addressed: the same bytes published again are the same Binary.
                blob.binary_id = given if given and ID_RE.fullmatch(given) else blob.sha256
                self.blobs.append(blob)
                if isinstance(raw.get("fullUrl"), str):
                    self.by_url[raw["fullUrl"]] = blob
                self.by_url[f"Binary/{blob.binary_id}"] = blob
                # The bytes live in doc_blobs; the resource keeps the metadata.
                entry["resource"] = {k: v for k, v in resource.items() if k != "data"}
                entry["request"] = {"method": "PUT", "url": f"Binary/{blob.binary_id}"}
        elif isinstance(resource, dict):
            entry["resource"] = common.copy_json(resource)
        return entry

    def _patch_fn(self, i: int, resource: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
        if isinstance(resource, dict) and resource.get("resourceType") == "Parameters":
            return lambda doc: fhirpath_patch(doc, resource)
        if isinstance(resource, dict) and resource.get("resourceType") == "Binary":
            try:
                ops = orjson.loads(decode_base64(resource.get("data"), "Binary.data"))
            except orjson.JSONDecodeError as exc:
                raise _at(BadRequest("the JSON Patch is not JSON"), i) from exc
            return lambda doc: apply_json_patch(doc, ops)
        raise _at(BadRequest("a PATCH entry carries a Parameters (FHIRPath Patch) or a JSON Patch Binary"), i)

    def _bundle_patients(self, entries: list[dict[str, Any]]) -> list[tuple[str, set[tuple[str, str]]]]:
        """(fullUrl, identifiers) of the Patients the Bundle itself writes."""
        out = []
        for e in entries:
            res = e.get("resource") if isinstance(e, dict) else None
            if (
                isinstance(res, dict)
                and res.get("resourceType") == "Patient"
                and isinstance(e.get("fullUrl"), str)
            ):
                idents = {
                    (str(i.get("system", "")), str(i["value"]))
                    for i in res.get("identifier") or ()
                    if isinstance(i, dict) and "value" in i
                }
                out.append((e["fullUrl"], idents))
        return out

    async def _find_patient(
        self, idents: list[tuple[str | None, str]], patients: list[tuple[str, set[tuple[str, str]]]]
    ) -> str:
        """The one Patient these identifiers (INS or IPP) designate: "Patient/id" or a fullUrl."""
        found = await identifier_patients(self.ops, idents)
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            raise Unprocessable("the patient identifiers match several patients", location="subject")
        for url, known in patients:
            if any(
                (s or "", v) in known or (s is None and any(v == kv for _, kv in known)) for s, v in idents
            ):
                return url
        raise Unprocessable("no patient is known with this identifier (INS or IPP)", location="subject")

    async def _resolve_subject(
        self, doc: dict[str, Any], patients: list[tuple[str, set[tuple[str, str]]]]
    ) -> None:
        subject = doc.get("subject")
        if not isinstance(subject, dict):
            raise Unprocessable("subject (the patient) is required", location="subject")
        ref = subject.get("reference")
        if isinstance(ref, str) and ref.startswith("Patient?"):
            params = parse_qsl(ref.partition("?")[2])
            idents = [split_identifier(v) for k, v in params if k == "identifier"]
            if not idents or len(idents) != len(params):
                raise Unprocessable(
                    "a conditional patient reference searches by identifier", location="subject"
                )
            subject["reference"] = await self._find_patient(idents, patients)
        elif isinstance(ref, str) and ref.startswith("urn:"):
            if ref not in {url for url, _ in patients}:
                raise Unprocessable("subject points at no Patient of this Bundle", location="subject")
        elif isinstance(ref, str):
            if not ref.startswith("Patient/") or await self.tx.fetch("Patient", ref[8:]) is None:
                raise Unprocessable(f"subject {ref!r} is not a known Patient", location="subject")
        elif isinstance(subject.get("identifier"), dict):
            ident = subject["identifier"]
            subject["reference"] = await self._find_patient(
                [(ident.get("system"), str(ident.get("value", "")))], patients
            )
        else:
            raise Unprocessable(
                "subject must reference the Patient (or carry its INS or IPP)", location="subject"
            )

    async def _resolve_conditional_refs(
        self, node: Any, patients: list[tuple[str, set[tuple[str, str]]]]
    ) -> None:
        """Every other ``Type?criteria`` reference of the entry becomes "Type/id" (one match)."""
        if isinstance(node, dict):
            for key, value in node.items():
                if (
                    key == "reference"
                    and isinstance(value, str)
                    and "?" in value
                    and not value.startswith("#")
                ):
                    type_, _, query = value.partition("?")
                    if type_ == "Patient":
                        params = parse_qsl(query)
                        node[key] = await self._find_patient(
                            [split_identifier(v) for k, v in params if k == "identifier"], patients
                        )
                        continue
                    ids = await self.tx.match(type_, criteria(query), 2)
                    if len(ids) != 1:
                        raise Unprocessable(
                            f"the conditional reference {type_}?… matches {len(ids)} resources",
                            location="reference",
                        )
                    node[key] = f"{type_}/{ids[0]}"
                else:
                    await self._resolve_conditional_refs(value, patients)
        elif isinstance(node, list):
            for item in node:
                await self._resolve_conditional_refs(item, patients)

    async def _existing(self, entry: dict[str, Any]) -> dict[str, Any] | None:
        """The current DocumentReference a PUT entry would overwrite, if any."""
        request = entry.get("request") or {}
        url = str(request.get("url", ""))
        if request.get("method") != "PUT":
            return None
        if url.startswith("DocumentReference/"):
            current = await self.tx.fetch("DocumentReference", url.split("/", 1)[1])
        else:
            ids = await self.tx.match("DocumentReference", criteria(url.partition("?")[2]), 2)
            current = await self.tx.fetch("DocumentReference", ids[0]) if len(ids) == 1 else None
        return current[2] if current is not None else None

    async def _check_document(
        self, i: int, entry: dict[str, Any], patients: list[tuple[str, set[tuple[str, str]]]]
    ) -> None:
        doc: dict[str, Any] = entry["resource"]
        store = self.store
        issues = self.issues.setdefault(i, [])
        where = f"Bundle.entry[{i}].resource"
        for name in ("status", "type", "subject", "content"):
            if not doc.get(name):
                raise Unprocessable(f"DocumentReference.{name} is required", location=f"{where}.{name}")
        if doc["status"] not in STATUSES:
            raise Unprocessable(f"status must be one of {', '.join(STATUSES)}", location=f"{where}.status")
        await self._resolve_subject(doc, patients)
        existing = await self._existing(entry)
        if existing is not None:
            _keep_managed(existing, doc)
            if existing.get("status") == "current" and doc["status"] == "entered-in-error":
                await check_author(self.ops, self.actor, existing["id"])
                await check_metadata_rights(self.ops, self.actor, existing["id"], existing, doc)
                self.deletes.add(i)
            elif not self.actor.may_delete_any and _content_differs(existing, doc):
                raise MethodNotAllowed(
                    "a published document changes only by metadata update (PATCH) or replacement",
                    location=f"{where}.id",
                )
        for j, content in enumerate(doc["content"]):
            await self._check_attachment(f"{where}.content[{j}].attachment", content, issues)
        for k, rel in enumerate(doc.get("relatesTo") or ()):
            if not (isinstance(rel, dict) and rel.get("code") == "replaces"):
                continue
            if doc["status"] != "current":
                # Only a current document replaces: one published deleted (or kept superseded by a
                # replay) leaves the document it names as it is.
                issues.append(
                    _issue(
                        "warning",
                        "business-rule",
                        f"a {doc['status']} document replaces nothing; the target is left as it is",
                        f"{where}.relatesTo[{k}]",
                    )
                )
                continue
            replaced = await self._replaced(f"{where}.relatesTo[{k}].target", rel, existing, issues)
            if replaced is not None:
                self.replaces.append((i, replaced))
        if store.mode is Mode.DMP:
            for name in ("date", "author"):
                if not doc.get(name):
                    raise Unprocessable(
                        f"the DMP requires DocumentReference.{name}", location=f"{where}.{name}"
                    )
        for path, valueset, coded in coded_elements(doc):
            if any(
                store.valuesets.contains(valueset, str(c.get("system")), str(c.get("code"))) for c in coded
            ):
                continue
            shown = ", ".join(f"{c.get('system')}|{c.get('code')}" for c in coded) or "no coding"
            text = f"{shown}: not in {valueset}"
            if store.mode is Mode.DMP:
                raise Unprocessable(text, location=f"{where}.{path}")
            issues.append(_issue("warning", "code-invalid", text, f"{where}.{path}"))

    async def _check_attachment(self, where: str, content: Any, issues: list[dict[str, Any]]) -> None:
        att = content.get("attachment") if isinstance(content, dict) else None
        if not isinstance(att, dict):
            raise Unprocessable("content.attachment is required", location=where)
        if "data" in att:
            blob = Blob(decode_base64(att["data"], f"{where}.data"), att.get("contentType"))
            if not blob.content_type:
                raise Unprocessable(
                    "attachment.contentType is required with data", location=f"{where}.contentType"
                )
            blob.binary_id = blob.sha256  # so that a replayed message changes nothing
            self.blobs.append(blob)
            self.inline.append(blob)
            del att["data"]
        else:
            url = att.get("url")
            match = BINARY_URL.search(url) if isinstance(url, str) else None
            # A Binary of this Bundle, by its fullUrl or its id (the feed names it Binary/<id>).
            key = url if isinstance(url, str) and url in self.by_url else None
            if key is None and match is not None and f"Binary/{match[1]}" in self.by_url:
                key = f"Binary/{match[1]}"
            if key is not None:
                blob = self.by_url[key]
            elif match and (known := await known_blob(self.ops, match[1])) is not None:
                blob = known
            else:
                raise Unprocessable(
                    "the attachment carries data or points at a Binary of this Bundle or server",
                    location=f"{where}.url",
                )
        att["url"] = f"Binary/{blob.binary_id}"
        if "contentType" not in att and blob.content_type:
            att["contentType"] = blob.content_type
        dmp = self.store.mode is Mode.DMP
        if "size" in att:
            if att["size"] != len(blob.data):
                raise Unprocessable(
                    f"attachment.size is {att['size']} but the document has {len(blob.data)} bytes",
                    location=f"{where}.size",
                )
        elif dmp:
            raise Unprocessable("the DMP requires attachment.size", location=f"{where}.size")
        else:
            att["size"] = len(blob.data)
            issues.append(
                _issue("warning", "required", "attachment.size was missing: computed", f"{where}.size")
            )
        if "hash" in att:
            try:
                given = base64.b64decode(str(att["hash"]), validate=True)
            except binascii.Error:
                given = b""
            if given != blob.sha1:
                raise Unprocessable(
                    "attachment.hash is not the SHA-1 of the document", location=f"{where}.hash"
                )
        elif dmp:
            raise Unprocessable("the DMP requires attachment.hash", location=f"{where}.hash")
        else:
            att["hash"] = base64.b64encode(blob.sha1).decode("ascii")
            issues.append(
                _issue("warning", "required", "attachment.hash was missing: computed", f"{where}.hash")
            )

    async def _replaced(
        self,
        where: str,
        rel: dict[str, Any],
        existing: Mapping[str, Any] | None = None,
        issues: list[dict[str, Any]] | None = None,
    ) -> str | None:
        """The id of the document ``rel`` replaces (to be superseded); None when the document sent
        (``existing``, as stored) already replaces it (the same replacement sent again), or when the
        gateway's own feed replaces a document it never received (the new version is published,
        the relation kept by identifier, with a warning: refusing it would leave the patient
        without the current version)."""
        target: dict[str, Any] = rel["target"] if isinstance(rel.get("target"), dict) else {}
        ref = target.get("reference")
        if isinstance(ref, str) and ref.startswith("DocumentReference?"):
            try:
                doc_id = await one_document(self.ops, ref.partition("?")[2], where)
            except NotFound as exc:
                params = parse_qsl(ref.partition("?")[2])
                if self.actor == FEED and issues is not None and len(params) == 1:
                    system, value = split_identifier(params[0][1])
                    rel["target"] = {
                        "identifier": {"system": system, "value": value} if system else {"value": value}
                    }
                    issues.append(
                        _issue(
                            "warning",
                            "not-found",
                            "the replaced document is not known: nothing superseded",
                            where,
                        )
                    )
                    return None
                raise Unprocessable(
                    f"the replaced document is not known: {exc.message}", location=where
                ) from None
        elif isinstance(ref, str) and "DocumentReference/" in ref:
            doc_id = ref.rsplit("/", 1)[-1]
        else:
            raise Unprocessable("relatesTo.target references the replaced DocumentReference", location=where)
        current = await self.tx.fetch("DocumentReference", doc_id)
        if (
            current is None
            or current[2] is None
            or not await visible(self.ops, self.actor, patient_of(current[2]), mask_of(current[2]), doc_id)
        ):
            raise Unprocessable(
                f"the replaced document DocumentReference/{doc_id} is not known", location=where
            )
        target["reference"] = f"DocumentReference/{doc_id}"
        rel["target"] = target
        if existing is not None and any(
            isinstance(r, dict)
            and r.get("code") == "replaces"
            and ((r.get("target") or {}).get("reference") or "").endswith(f"DocumentReference/{doc_id}")
            for r in existing.get("relatesTo") or ()
        ):
            return None  # a replay: the replacement is done, whatever became of the old one since
        if current[2].get("status") != "current":
            raise Conflict(
                f"DocumentReference/{doc_id} is {current[2].get('status')}, not current", location=where
            )
        return doc_id

    async def _after(self, entries: list[dict[str, Any]], results: list[dict[str, Any]]) -> None:
        for blob in self.blobs:
            await self.ops.store_blob(blob)
        for blob in self.inline:
            await common.put(
                self.tx,
                "Binary",
                blob.binary_id,
                {"resourceType": "Binary", "contentType": blob.content_type},
            )
        written: dict[int, dict[str, Any]] = {}
        for i, entry in enumerate(entries):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not (isinstance(resource, dict) and resource.get("resourceType") == "DocumentReference"):
                continue
            location = str(results[i]["response"].get("location", ""))
            doc_id = location.split("/")[1] if location.startswith("DocumentReference/") else ""
            current = await self.tx.fetch("DocumentReference", doc_id)
            if current is None or current[2] is None:
                continue
            doc = current[2]
            if not patient_of(doc):
                raise _at(Unprocessable("subject is not a Patient", location="resource.subject"), i)
            await index_document(self.ops, doc)
            written[i] = doc
        for i, old_id in self.replaces:
            try:
                old = await self.tx.fetch("DocumentReference", old_id)
                assert old is not None and old[2] is not None
                if patient_of(old[2]) != patient_of(written[i]):
                    raise Unprocessable(
                        "a document replaces only a document of the same patient",
                        location="resource.relatesTo",
                    )
                superseded = {**old[2], "status": "superseded"}
                await check_metadata_rights(self.ops, self.actor, old_id, old[2], superseded)
                await self.update(old[2], superseded)
            except PasserelleError as exc:
                raise _at(exc, i) from None
        for i, special in self.specials.items():
            try:
                results[i] = await self._special(special)
            except PasserelleError as exc:
                raise _at(exc, i) from None

    async def _special(self, special: _Special) -> dict[str, Any]:
        rest = special.url.partition("/")[2]
        if "?" in special.url:
            doc_id = await one_document(self.ops, special.url.partition("?")[2], "request.url")
        else:
            doc_id = rest
        current = await self.tx.fetch("DocumentReference", doc_id)
        absent = NotFound(f"DocumentReference/{doc_id} is not known", location="request.url")
        if current is None or current[2] is None:
            raise absent
        before = current[2]
        if not await visible(self.ops, self.actor, patient_of(before), mask_of(before), doc_id):
            raise absent
        if special.method == "DELETE":
            after = {**before, "status": "entered-in-error"}
            await check_author(self.ops, self.actor, doc_id)
        else:
            assert special.patch is not None
            after = special.patch(before)
            check_metadata_update(before, after)
        await check_metadata_rights(self.ops, self.actor, doc_id, before, after)
        stored = await self.update(before, after, validate=special.method == "PATCH")
        return _response(200, "DocumentReference", stored)

    async def update(
        self, before: Mapping[str, Any], after: dict[str, Any], *, validate: bool = False
    ) -> dict[str, Any]:
        """Write ``after`` as the document's next version (``before`` names it) and reindex it."""
        body = {k: v for k, v in after.items() if k != "meta"}
        if validate and self.store.validator is not None:
            # What a patch made: validated as any written resource (bindings, primitive types).
            self.store.validator(body)
        stored, _ = await common.put(self.tx, "DocumentReference", str(before["id"]), body)
        await index_document(self.ops, stored.body)
        return stored.body


def _keep_managed(existing: Mapping[str, Any], incoming: dict[str, Any]) -> None:
    """A document sent again (a replayed message) keeps what the store and metadata updates
    decided since: superseded or deleted stays so, and its visibility and archive flag stay."""
    if existing.get("status") in ("superseded", "entered-in-error") and incoming.get("status") == "current":
        incoming["status"] = existing["status"]
    if "securityLabel" in existing and "securityLabel" not in incoming:
        incoming["securityLabel"] = existing["securityLabel"]
    archive = [
        e for e in existing.get("extension") or () if isinstance(e, dict) and e.get("url") == IS_ARCHIVED
    ]
    if archive and not any(
        isinstance(e, dict) and e.get("url") == IS_ARCHIVED for e in incoming.get("extension") or ()
    ):
        incoming["extension"] = [*(incoming.get("extension") or ()), *archive]


def _content_differs(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    skip = ("meta", "id")
    a = {k: v for k, v in before.items() if k not in skip}
    b = {k: v for k, v in after.items() if k not in skip}
    return a != b
