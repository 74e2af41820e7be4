"""The PDSm / IHE MHD transactions under /fhir, served by the document store.

These routes are registered before the generic /fhir ones, so that for documents the DMP's
rules apply whichever way a client comes in:

- ITI-65 ``POST /fhir`` with a Bundle holding a DocumentReference (other Bundles go on to the
  generic handler); ITI-105 ``POST /fhir/DocumentReference``;
- ITI-67 ``GET /fhir/DocumentReference?…``, ITI-66 ``GET /fhir/List?…``, ITI-68
  ``GET /fhir/Binary/{id}`` (the bytes, in their own content type);
- metadata update ``PATCH /fhir/DocumentReference?identifier=…`` (JSON Patch), logical delete
  ``DELETE /fhir/DocumentReference/{id}`` (author only).

Every call needs a caller (a bearer credential). What the caller may see follows its role:

=================  ==========================================================================
caller             documents it never sees (TRE_A07 visibility codes)
=================  ==========================================================================
professional       MASQUE_PS; with scope ``audience:social`` also MASQUE_PSOCIAL, with
                   ``audience:third-party`` also MASQUE_PT (scopes add masks, never remove
                   one: the most restrictive rule wins), except the documents it authored
patient            INVISIBLE_PATIENT, and only their own (``patients`` identifiers); with scope
                   ``audience:legal-representative`` also INVISIBLE_REPRESENTANTS_LEGAUX
operator, admin    none
=================  ==========================================================================

Nor does a caller see a List entry that points at a document it may not see, nor the List itself
when every document it names is hidden from it (a SubmissionSet would tell that they exist).

Who changes a published document (metadata update, Bundle PATCH/DELETE entries, replacement):

=================  ==========================================================================
caller             may change
=================  ==========================================================================
its author         status, every securityLabel (visibility, confidentiality), isArchived
patient            the masks from professionals (MASQUE_PS, MASQUE_PSOCIAL, MASQUE_PT) of the
                   documents of their own record they see; nothing else
other professional nothing of these (403)
admin, the feed    everything a metadata update may change
=================  ==========================================================================
"""

from __future__ import annotations

import asyncio
import base64
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from gateway.core.errors import BadRequest, Forbidden, MethodNotAllowed, NotFound, UnsupportedMediaType
from gateway.fhir.outcome import outcome
from gateway.fhir.resource import ID_RE
from gateway.fhir.search import DEFAULT_COUNT, MAX_COUNT
from gateway.fhir.validation import Bindings, InvalidResource, validate_resource
from gateway.http import fhir as fhir_routes
from gateway.http.auth import Caller, Role, caller_of, require
from gateway.http.fhir import (
    FHIR_REPOSITORY,
    VERSIONS,
    Handler,
    _body,
    _validate_entries,
    _version_headers,
    add_capability,
    fhir_response,
    searchset,
)
from gateway.http.fhir_routing import routed
from gateway.http.scope import DOCUMENT_RULES, compartment_of, is_mhd_list, visible_included
from gateway.store.backends import document_store
from gateway.store.documents import (
    INVISIBLE_PATIENT,
    INVISIBLE_REPRESENTANTS_LEGAUX,
    LIST_SEARCH_PARAMS,
    MASQUE_PS,
    MASQUE_PSOCIAL,
    MASQUE_PT,
    Actor,
    BaseDocumentStore,
    Mode,
    ValueSets,
    is_unrestricted,
)
from gateway.store.documents.search import SEARCH_PARAM_TYPES
from gateway.store.fhir_common import FhirRepository, SearchResult, parse_search

DOCUMENT_STORE: web.AppKey[BaseDocumentStore] = web.AppKey("document_store", BaseDocumentStore)
JSON_PATCH = "application/json-patch+json"
# Search parameters the generic List search serves; anything else is ITI-66.
_GENERIC_LIST_PARAMS = frozenset(
    {"_id", "identifier", "subject", "subject.identifier", "encounter", "_lastUpdated", "_count", "_offset"}
    | {"_include", "_sort", "_format", "_pretty"}
)
_READ_ROLES = (Role.PROFESSIONAL, Role.PATIENT, Role.OPERATOR)
_WRITE_ROLES = (Role.PROFESSIONAL,)
# A patient may mask and unmask their own documents from professionals (the store says which labels).
_METADATA_ROLES = (Role.PROFESSIONAL, Role.PATIENT)
# A patient may add documents to their own record (the store checks whose record it is).
_PUBLISH_ROLES = (Role.PROFESSIONAL, Role.PATIENT)


def actor_for(caller: Caller) -> Actor:
    """The store's view of a caller: which visibility codes hide documents from it."""
    if caller.role in (Role.ADMIN, Role.OPERATOR):
        return Actor(subject=caller.subject, may_delete_any=caller.role is Role.ADMIN)
    if caller.role is Role.PATIENT:
        hidden = INVISIBLE_PATIENT
        if "audience:legal-representative" in caller.scopes:
            hidden |= INVISIBLE_REPRESENTANTS_LEGAUX
        return Actor(hidden=hidden, patients=tuple(caller.patients), subject=caller.subject)
    # A professional always hides what is masked from professionals; each audience it holds adds
    # that audience's mask. A scope never lifts a mask: the most restrictive rule wins.
    hidden = MASQUE_PS
    for scope, bit in _AUDIENCE_MASKS.items():
        if scope in caller.scopes:
            hidden |= bit
    return Actor(hidden=hidden, practitioner=caller.practitioner, subject=caller.subject)


_AUDIENCE_MASKS = {"audience:social": MASQUE_PSOCIAL, "audience:third-party": MASQUE_PT}


def add_document_routes(
    app: web.Application, repository: FhirRepository, settings: Mapping[str, Any] | None = None
) -> None:
    """Register the MHD routes (before ``add_fhir_routes``) when the repository is a built-in one."""
    settings = settings or {}
    directory = settings.get("valuesets")
    store = document_store(
        repository,
        mode=Mode(settings.get("mode", Mode.PDSM.value)),
        valuesets=ValueSets.load(Path(directory)) if directory else None,
    )
    if store is None:
        return
    # What a metadata update makes is checked as any write, required bindings included.
    store.validator = functools.partial(validate_resource, bindings=Bindings.REQUIRED)
    app[DOCUMENT_STORE] = store
    app[VERSIONS] = store  # the repository's versions, read through the store's connections
    app[DOCUMENT_RULES] = StoreRules(store)
    router = app.router
    # "{type:X}" keeps match_info["type"], so that a route can hand over to the generic handler.
    docs, lists, binary = "/fhir/{type:DocumentReference}", "/fhir/{type:List}", "/fhir/{type:Binary}"
    router.add_post("/fhir", _reports_issues(provide_bundle))
    router.add_get(docs, find_documents)
    router.add_post(docs, _reports_issues(simplified_publish))
    router.add_put(docs, not_allowed)
    router.add_patch(docs, _reports_issues(update_metadata))
    router.add_get(docs + "/{id}", read_document)
    router.add_put(docs + "/{id}", not_allowed)
    router.add_patch(docs + "/{id}", _reports_issues(update_metadata))
    router.add_delete(docs + "/{id}", delete_document)
    router.add_get(lists, find_lists)
    router.add_get(lists + "/{id}", read_list)
    router.add_get(binary + "/{id}", retrieve_document)
    router.add_get(binary, find_binaries)
    for entry in _capabilities():
        add_capability(app, entry)


_PARAM_DOCS = {
    "patient": "required (or patient.identifier): Patient/id or id",
    "patient.identifier": "required (or patient): system|value of an INS or IPP",
    "status": "required: current, superseded, entered-in-error",
    "relatesto": "DocumentReference/id (alias relatesTo)",
    "author": "Practitioner/id, or a contained author's reference",
    "author.identifier": "system|value of the author (RPPS, IDNPS...)",
    "period": "overlaps the service period; prefixes eq ge gt le lt",
    "isArchived": "true or false (PDSm archive flag)",
}
_FIXED = {"versioning": "versioned", "readHistory": True, "conditionalDelete": "not-supported"}
_VERSION_READS = [
    {"code": "vread", "documentation": "to who may read the document (or List, Binary) now"},
    {"code": "history-instance", "documentation": "to who may read the document (or List, Binary) now"},
]


def _params(table: Mapping[str, str], docs: Mapping[str, str]) -> list[dict[str, Any]]:
    out = []
    for name, kind in table.items():
        param = {"name": name, "type": kind}
        if name in docs:
            param["documentation"] = docs[name]
        out.append(param)
    return out


def _capabilities() -> list[dict[str, Any]]:
    """The CapabilityStatement entries of the routes above, made from the tables the handlers use."""
    generic_lists = {"_id": "token", "identifier": "token", "subject": "reference", "encounter": "reference"}
    generic_lists |= {"subject.identifier": "token", "_lastUpdated": "date"}
    return [
        {
            "type": "DocumentReference",
            "documentation": "PDSm / IHE MHD Document Responder with the DMP rules (replacement, archive,"
            " masking by role, author-only delete, size and SHA-1 hash checked); _count, _offset",
            "interaction": [
                {"code": "read", "documentation": "masked documents are not found by who may not see them"},
                {"code": "search-type", "documentation": "ITI-67 Find Document References"},
                {"code": "create", "documentation": "ITI-105 Simplified Publish (attachment.data)"},
                {
                    "code": "patch",
                    "documentation": "metadata update, JSON Patch, also conditional (DocumentReference?"
                    "identifier=…): status, securityLabel and the isArchived extension only, else 405",
                },
                {"code": "delete", "documentation": "logical (status entered-in-error), by the author only"},
                *_VERSION_READS,
            ],
            **_FIXED,
            "updateCreate": False,
            "conditionalCreate": False,
            "conditionalUpdate": False,
            "searchParam": _params(SEARCH_PARAM_TYPES, _PARAM_DOCS),
        },
        {
            "type": "List",
            "documentation": "ITI-66 Find Lists (SubmissionSets, Folders) with patient or patient.identifier;"
            " without them, the generic search on _id, identifier, subject, encounter, _lastUpdated."
            " A caller that masking or patient scope limits sees no entry naming a document hidden"
            " from it, nor a List naming only such documents (left out of totals too); its generic"
            f" search filters at most {MAX_FILTERED_LISTS} matches (400 beyond: narrow it)",
            "interaction": [{"code": c} for c in ("read", "search-type", "create", "update", "delete")]
            + _VERSION_READS,
            **_FIXED,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalUpdate": True,
            "searchParam": _params({**LIST_SEARCH_PARAMS, **generic_lists}, {}),
        },
        {
            "type": "Binary",
            "documentation": "ITI-68 Retrieve Document: GET Binary/{id} answers the bytes in their own"
            " content type (a Binary resource when FHIR JSON is asked); no search for callers that"
            " masking or patient scope limits",
            "interaction": [{"code": c} for c in ("read", "search-type", "create", "update", "delete")]
            + _VERSION_READS,
            **_FIXED,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalUpdate": True,
            "searchParam": _params({"_id": "token", "_lastUpdated": "date"}, {}),
        },
    ]


class StoreRules:
    """The document store's rules for documents met on the generic routes (gateway.http.scope)."""

    def __init__(self, store: BaseDocumentStore) -> None:
        self.store = store

    async def visible(self, request: web.Request, resource: Mapping[str, Any]) -> bool:
        caller = caller_of(request)
        actor = actor_for(caller) if caller is not None else Actor()
        type_, id_ = resource.get("resourceType"), resource.get("id")
        if not isinstance(id_, str):
            return False
        if type_ == "DocumentReference":
            return await self.store.read(id_, actor) is not None
        if type_ == "List":
            return await self.store.read_list(id_, actor) is not None
        if type_ == "Binary":
            if await self.store.retrieve(id_, actor) is not None:
                return True
            # A Binary outside the store: as ITI-68 answers, only for unrestricted callers.
            return actor.patients is None and not actor.hidden
        return True

    async def view(self, request: web.Request, resource: Mapping[str, Any]) -> Mapping[str, Any] | None:
        if not await self.visible(request, resource):
            return None
        if resource.get("resourceType") == "List":
            caller = caller_of(request)
            actor = actor_for(caller) if caller is not None else Actor()
            return (await self.store.visible_lists([dict(resource)], actor))[0]
        return resource

    async def managed(self, type_: str, id_: str) -> bool:
        if type_ == "Binary":
            return await self.store.retrieve(id_, Actor()) is not None
        if type_ == "List":
            return is_mhd_list(await self.store.repository.read("List", id_))
        return False


def _store(request: web.Request) -> BaseDocumentStore:
    return request.app[DOCUMENT_STORE]


def _repository(request: web.Request) -> FhirRepository:
    return request.app[FHIR_REPOSITORY]


def _reports_issues(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except InvalidResource as exc:
            return fhir_response(exc.outcome(), exc.http_status)

    return wrapped


def _base(request: web.Request) -> str:
    return f"{request.url.origin()}/fhir"


def _absolute(request: web.Request, doc: dict[str, Any]) -> dict[str, Any]:
    """attachment.url as the absolute ITI-68 address a client can GET."""
    for content in doc.get("content") or ():
        att = content.get("attachment") if isinstance(content, dict) else None
        if isinstance(att, dict) and isinstance(att.get("url"), str) and att["url"].startswith("Binary/"):
            att["url"] = f"{_base(request)}/{att['url']}"
    return doc


def _is_document_bundle(data: Mapping[str, Any]) -> bool:
    entries = data.get("entry")
    for entry in entries if isinstance(entries, list) else ():  # a bad one is the Bundle route's 400
        if not isinstance(entry, dict):
            continue
        resource = entry.get("resource")
        if isinstance(resource, dict) and resource.get("resourceType") == "DocumentReference":
            return True
        request = entry.get("request")
        if (
            isinstance(request, dict)
            and request.get("method") in ("PATCH", "DELETE")
            and str(request.get("url", "")).startswith("DocumentReference")
        ):
            return True
    return False


async def provide_bundle(request: web.Request) -> web.Response:
    """ITI-65 when the Bundle carries documents; any other Bundle goes to the generic handler."""
    data = await _body(request)
    _no_document_reads(request, data)
    if (
        data.get("resourceType") != "Bundle"
        or data.get("type") != "transaction"
        or not _is_document_bundle(data)
    ):
        return await fhir_routes.bundle(request)  # the body is cached: it reads it again
    actor = actor_for(require(request, *_PUBLISH_ROLES))
    entries = data.get("entry") or []
    if not isinstance(entries, list):
        raise BadRequest("Bundle.entry must be a list", location="Bundle.entry")
    await asyncio.to_thread(_validate_entries, entries, True)

    async def write() -> web.Response:
        return fhir_response(await _store(request).publish(data, actor))

    return await routed(request, data, "POST", write)  # a channel may route it too (e.g. to MDM)


_DOCUMENT_TYPES = ("DocumentReference", "Binary", "List")


def _no_document_reads(request: web.Request, data: Mapping[str, Any]) -> None:
    """A Bundle's GET entries would read documents past the masking and patient rules: a caller
    those rules limit reads documents through ITI-66/67/68 instead."""
    caller = caller_of(request)
    if caller is None:
        return
    actor = actor_for(caller)
    if actor.patients is None and not actor.hidden:
        return
    entries = data.get("entry")
    for i, entry in enumerate(entries if isinstance(entries, list) else ()):
        req = entry.get("request") if isinstance(entry, dict) else None
        url = req.get("url") if isinstance(req, dict) else None
        if (
            isinstance(url, str)
            and req is not None
            and req.get("method") in ("GET", "HEAD")
            and url.lstrip("/").split("?")[0].split("/")[0] in _DOCUMENT_TYPES
        ):
            raise Forbidden(
                "read documents with DocumentReference?, List? and Binary/{id} (ITI-67/66/68),"
                " not inside a Bundle",
                location=f"Bundle.entry[{i}].request.url",
            )


async def simplified_publish(request: web.Request) -> web.Response:
    """ITI-105: one DocumentReference carrying its document in ``attachment.data``."""
    actor = actor_for(require(request, *_PUBLISH_ROLES))
    resource = await _body(request)
    if resource.get("resourceType") != "DocumentReference":
        raise BadRequest("resourceType must be DocumentReference", location="resourceType")
    # Required bindings: a published DocumentReference is held to what a /fhir write is.
    await asyncio.to_thread(validate_resource, resource, bindings=Bindings.REQUIRED)

    async def write() -> web.Response:
        return await _published(request, resource, actor)

    return await routed(request, resource, "POST", write)


async def _published(request: web.Request, resource: dict[str, Any], actor: Actor) -> web.Response:
    stored, warnings = await _store(request).publish_document(resource, actor)
    version = stored["meta"]["versionId"]
    headers = {"Location": fhir_routes.location(request, stored), "ETag": f'W/"{version}"'}
    if "return=OperationOutcome" in request.headers.get("Prefer", ""):
        issues = warnings or [
            {"severity": "information", "code": "informational", "diagnostics": "published"}
        ]
        return fhir_response(outcome(*issues), 201, headers)
    return fhir_response(_absolute(request, stored), 201, headers)


async def find_documents(request: web.Request) -> web.Response:
    """ITI-67."""
    actor = actor_for(require(request, *_READ_ROLES))
    params = list(request.query.items())
    result = await _store(request).search(params, actor)
    for doc in result.matches:
        _absolute(request, doc)
    kept = [(k, v) for k, v in params if k not in ("_format", "_pretty")]
    return fhir_response(searchset(request, "DocumentReference", kept, result))


async def read_document(request: web.Request) -> web.Response:
    actor = actor_for(require(request, *_READ_ROLES))
    id_ = request.match_info["id"]
    doc = await _store(request).read(id_, actor)
    if doc is None:
        raise NotFound(f"DocumentReference/{id_} is not known")
    meta = doc.get("meta") or {}
    return fhir_response(_absolute(request, doc), headers={"ETag": f'W/"{meta.get("versionId", "")}"'})


async def retrieve_document(request: web.Request) -> web.Response:
    """ITI-68: the document's bytes in their content type (a Binary resource when JSON is asked)."""
    actor = actor_for(require(request, *_READ_ROLES))
    id_ = request.match_info["id"]
    found = await _store(request).retrieve(id_, actor)
    if found is None:
        if actor.patients is None and not actor.hidden:
            return await fhir_routes.read(request)  # a Binary stored outside the document store
        raise NotFound(f"Binary/{id_} is not known")
    accept = request.headers.get("Accept", "")
    if "fhir+json" in accept or accept.strip() == "application/json":
        body = {"resourceType": "Binary", "id": id_, "contentType": found.content_type}
        body["data"] = base64.b64encode(found.data).decode("ascii")
        return fhir_response(body)
    # The publisher chose the content type: never let a browser sniff it or run it on our origin.
    headers = {
        "Content-Type": found.content_type,
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
        "Content-Disposition": "attachment",
    }
    return web.Response(body=found.data, headers=headers)


async def update_metadata(request: web.Request) -> web.Response:
    """Conditional PATCH (JSON Patch): status, securityLabel, isArchived only; else 405. Who may
    change which of them: see the module's table (the store enforces it)."""
    actor = actor_for(require(request, *_METADATA_ROLES))
    if request.content_type != JSON_PATCH:
        raise UnsupportedMediaType(f"send {JSON_PATCH}")
    id_ = request.match_info.get("id")
    if id_ is None and not request.query_string:
        raise BadRequest("PATCH DocumentReference?identifier=… or DocumentReference/{id}")
    try:
        operations = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON: {exc.msg}") from exc
    target = id_ if id_ is not None else "?" + request.query_string
    stored = await _store(request).patch(target, operations, actor)
    return fhir_response(_absolute(request, stored), headers={"ETag": f'W/"{stored["meta"]["versionId"]}"'})


async def delete_document(request: web.Request) -> web.Response:
    actor = actor_for(require(request, *_WRITE_ROLES))
    stored = await _store(request).delete(request.match_info["id"], actor)
    return fhir_response(_absolute(request, stored), headers={"ETag": f'W/"{stored["meta"]["versionId"]}"'})


async def not_allowed(request: web.Request) -> web.Response:
    raise MethodNotAllowed(
        "a published document changes by metadata update (PATCH) or by replacement (ITI-65), not PUT"
    )


async def find_lists(request: web.Request) -> web.Response:
    """ITI-66 (patient, code, status...); a plain List search goes to the generic handler, and for
    callers the masking or patient rules limit, through the same filter as ITI-66."""
    params = list(request.query.items())
    if all(name in _GENERIC_LIST_PARAMS for name, _ in params) and not any(
        name in ("patient", "patient.identifier") for name, _ in params
    ):
        caller = caller_of(request)
        actor = actor_for(caller) if caller is not None else Actor()
        if is_unrestricted(actor):
            return await fhir_routes.search(request)
        # A patient's generic List search: narrowed to the Lists about their own record.
        allowed = await _store(request).allowed_patients(actor)
        narrowed = [("subject", ",".join(sorted(allowed)) or "Patient/-")] if allowed is not None else []
        result = await _visible_list_search(request, params, narrowed, actor)
        compartment = await compartment_of(request, _repository(request), "List")
        result = await visible_included(request, result, compartment)
        return fhir_response(searchset(request, "List", params, result))
    actor = actor_for(require(request, *_READ_ROLES))
    result = await _store(request).search_lists(params, actor)
    return fhir_response(searchset(request, "List", params, result))


# A limited caller's generic List search filters every match (a List naming only documents hidden
# from the caller is not shown, nor counted): up to this many matches, else narrow the search.
MAX_FILTERED_LISTS = 5_000


async def _visible_list_search(
    request: web.Request, params: list[tuple[str, str]], narrowed: list[tuple[str, str]], actor: Actor
) -> SearchResult:
    """The generic List search with the document store's List filter (``visible_list``): exact
    totals and pages, since every match is filtered before paging."""
    parsed = parse_search("List", params)  # a BadRequest before any I/O
    count = parsed.count if parsed.count is not None else DEFAULT_COUNT
    offset = parsed.offset or 0
    criteria = [(k, v) for k, v in params if k not in ("_count", "_offset", "_include")] + narrowed
    repo, store = _repository(request), _store(request)
    shown: list[dict[str, Any]] = []
    total = scanned = 0
    while True:
        page = await repo.search("List", [*criteria, ("_count", str(MAX_COUNT)), ("_offset", str(scanned))])
        if page.total > MAX_FILTERED_LISTS:
            raise BadRequest(
                f"more than {MAX_FILTERED_LISTS} Lists match: narrow the search (_id, identifier,"
                " subject, _lastUpdated), or find a patient's Lists with patient= (ITI-66)"
            )
        for view in await store.visible_lists(page.matches, actor):
            if view is None:
                continue
            if offset <= total < offset + count:
                shown.append(view)
            total += 1
        scanned += len(page.matches)
        if not page.matches or scanned >= page.total:
            break
    included: list[dict[str, Any]] = []
    includes = [(k, v) for k, v in params if k == "_include"]
    if includes and shown:
        ids = ",".join(str(v["id"]) for v in shown)
        found = await repo.search("List", [("_id", ids), *includes, ("_count", str(len(shown)))])
        included = found.included
    return SearchResult(shown, total, included, count, offset)


async def read_list(request: web.Request) -> web.Response:
    """A List read: a caller limited to some patients reads the Lists about them only, and a
    caller the masking rules limit does not see what names hidden documents (``visible_list``)."""
    caller = caller_of(request)
    actor = actor_for(caller) if caller is not None else None
    if actor is None or is_unrestricted(actor):
        return await fhir_routes.read(request)
    id_ = request.match_info["id"]
    found = await _store(request).read_list(id_, actor) if ID_RE.fullmatch(id_) else None
    if found is None:
        repo = _repository(request)
        if actor.patients is None and ID_RE.fullmatch(id_) and await repo.is_deleted("List", id_):
            raise fhir_routes.Gone(f"List/{id_} was deleted")
        raise NotFound(f"List/{id_} is not known")
    return fhir_response(found, headers=_version_headers(found))


async def find_binaries(request: web.Request) -> web.Response:
    """A Binary search would list documents past the masking and patient rules: unrestricted callers only."""
    caller = caller_of(request)
    if caller is not None:
        actor = actor_for(caller)
        if actor.patients is not None or actor.hidden:
            raise Forbidden("documents are found with DocumentReference? (ITI-67), then read by their URL")
    return await fhir_routes.search(request)
