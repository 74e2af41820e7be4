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
professional       MASQUE_PS; with scope ``audience:social`` MASQUE_PSOCIAL instead, with
                   ``audience:third-party`` MASQUE_PT instead
patient            INVISIBLE_PATIENT, and only their own (``patients`` identifiers); with scope
                   ``audience:legal-representative`` also INVISIBLE_REPRESENTANTS_LEGAUX
operator, admin    none
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

from gateway.core.errors import BadRequest, MethodNotAllowed, NotFound, UnsupportedMediaType
from gateway.http import fhir as fhir_routes
from gateway.http.auth import Caller, Role, require
from gateway.http.fhir import (
    Handler,
    InvalidResource,
    _body,
    _validate_entries,
    fhir_response,
    searchset,
    validate_resource,
)
from gateway.store.documents import (
    INVISIBLE_PATIENT,
    INVISIBLE_REPRESENTANTS_LEGAUX,
    MASQUE_PS,
    MASQUE_PSOCIAL,
    MASQUE_PT,
    Actor,
    Mode,
    SqliteDocumentStore,
    ValueSets,
)
from gateway.store.fhir import FhirRepository, SqliteFhirRepository

DOCUMENT_STORE: web.AppKey[SqliteDocumentStore] = web.AppKey("document_store", SqliteDocumentStore)
JSON_PATCH = "application/json-patch+json"
# Search parameters the generic List search serves; anything else is ITI-66.
_GENERIC_LIST_PARAMS = frozenset(
    {"_id", "identifier", "subject", "subject.identifier", "encounter", "_lastUpdated", "_count", "_offset"}
    | {"_include", "_sort", "_format", "_pretty"}
)
_READ_ROLES = (Role.PROFESSIONAL, Role.PATIENT, Role.OPERATOR)
_WRITE_ROLES = (Role.PROFESSIONAL,)


def actor_for(caller: Caller) -> Actor:
    """The store's view of a caller: which visibility codes hide documents from it."""
    if caller.role in (Role.ADMIN, Role.OPERATOR):
        return Actor(subject=caller.subject, may_delete_any=caller.role is Role.ADMIN)
    if caller.role is Role.PATIENT:
        hidden = INVISIBLE_PATIENT
        if "audience:legal-representative" in caller.scopes:
            hidden |= INVISIBLE_REPRESENTANTS_LEGAUX
        return Actor(hidden=hidden, patients=tuple(caller.patients), subject=caller.subject)
    hidden = MASQUE_PS
    if "audience:social" in caller.scopes:
        hidden = MASQUE_PSOCIAL
    elif "audience:third-party" in caller.scopes:
        hidden = MASQUE_PT
    return Actor(hidden=hidden, practitioner=caller.practitioner, subject=caller.subject)


def add_document_routes(
    app: web.Application, repository: FhirRepository, settings: Mapping[str, Any] | None = None
) -> None:
    """Register the MHD routes (before ``add_fhir_routes``) when the repository is the built-in one."""
    if not isinstance(repository, SqliteFhirRepository):
        return
    settings = settings or {}
    directory = settings.get("valuesets")
    store = SqliteDocumentStore(
        repository,
        mode=Mode(settings.get("mode", Mode.PDSM.value)),
        valuesets=ValueSets.load(Path(directory)) if directory else None,
    )
    app[DOCUMENT_STORE] = store
    router = app.router
    # "{type:X}" keeps match_info["type"], so that a route can hand over to the generic handler.
    docs, lists, binary = "/fhir/{type:DocumentReference}", "/fhir/{type:List}", "/fhir/{type:Binary}"
    router.add_post("/fhir", _reports_issues(provide_bundle))
    router.add_get(docs, find_documents)
    router.add_post(docs, _reports_issues(simplified_publish))
    router.add_put(docs, not_allowed)
    router.add_patch(docs, update_metadata)
    router.add_get(docs + "/{id}", read_document)
    router.add_put(docs + "/{id}", not_allowed)
    router.add_patch(docs + "/{id}", update_metadata)
    router.add_delete(docs + "/{id}", delete_document)
    router.add_get(lists, find_lists)
    router.add_get(binary + "/{id}", retrieve_document)


def _store(request: web.Request) -> SqliteDocumentStore:
    return request.app[DOCUMENT_STORE]


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
    for entry in data.get("entry") or ():
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
    if (
        data.get("resourceType") != "Bundle"
        or data.get("type") != "transaction"
        or not _is_document_bundle(data)
    ):
        return await fhir_routes.bundle(request)  # the body is cached: it reads it again
    actor = actor_for(require(request, *_WRITE_ROLES))
    entries = data.get("entry") or []
    if not isinstance(entries, list):
        raise BadRequest("Bundle.entry must be a list", location="Bundle.entry")
    await asyncio.to_thread(_validate_entries, entries, True)
    answer = await _store(request).publish(data, actor)
    return fhir_response(answer)


async def simplified_publish(request: web.Request) -> web.Response:
    """ITI-105: one DocumentReference carrying its document in ``attachment.data``."""
    actor = actor_for(require(request, *_WRITE_ROLES))
    resource = await _body(request)
    if resource.get("resourceType") != "DocumentReference":
        raise BadRequest("resourceType must be DocumentReference", location="resourceType")
    await asyncio.to_thread(validate_resource, resource)
    stored, warnings = await _store(request).publish_document(resource, actor)
    version = stored["meta"]["versionId"]
    headers = {
        "Location": f"{_base(request)}/DocumentReference/{stored['id']}/_history/{version}",
        "ETag": f'W/"{version}"',
    }
    if "return=OperationOutcome" in request.headers.get("Prefer", ""):
        issues = warnings or [
            {"severity": "information", "code": "informational", "diagnostics": "published"}
        ]
        return fhir_response({"resourceType": "OperationOutcome", "issue": issues}, 201, headers)
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
    return web.Response(body=found.data, headers={"Content-Type": found.content_type})


async def update_metadata(request: web.Request) -> web.Response:
    """Conditional PATCH (JSON Patch): status, securityLabel, isArchived only; else 405."""
    actor = actor_for(require(request, *_WRITE_ROLES))
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
    """ITI-66 (patient, code, status...); a plain List search goes to the generic handler."""
    params = list(request.query.items())
    if all(name in _GENERIC_LIST_PARAMS for name, _ in params) and not any(
        name in ("patient", "patient.identifier") for name, _ in params
    ):
        return await fhir_routes.search(request)
    actor = actor_for(require(request, *_READ_ROLES))
    result = await _store(request).search_lists(params, actor)
    return fhir_response(searchset(request, "List", params, result))
