"""The FHIR R4 REST API under /fhir, on the built-in repository.

Every resource is validated by gateway.fhir.validation (the R4B models, FHIR JSON primitive
types, required bindings) before it reaches the repository (which trusts its callers). Every
answer is ``application/fhir+json`` (another ``_format`` is 406); every error an OperationOutcome
(the shared middleware renders single-issue ones, this module the validation reports that list
one issue per problem). The versions the repository keeps are served: ``Type/id/_history/N``
(vread, the ``Location`` of every write) and ``Type/id/_history``, within what the caller may
read (gateway.http.scope).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode

import orjson
from aiohttp import web

from gateway.core.envelope import FHIR_JSON
from gateway.core.errors import (
    BadRequest,
    Forbidden,
    HttpError,
    NotFound,
    PasserelleError,
    UnsupportedMediaType,
)
from gateway.fhir.outcome import information
from gateway.fhir.resource import ID_RE
from gateway.fhir.search import CHAINED_PARAMS, DEFAULT_COUNT, REFERENCE_PARAMS
from gateway.fhir.validation import (
    Bindings,
    InvalidResource,
    UnsupportedResourceType,
    closed_codes,
    conforms_fast,
    model_of,
    validate_resource,
)
from gateway.http import scope
from gateway.http.auth import Role, caller_of
from gateway.http.fhir_routing import routed
from gateway.store.documents import Version
from gateway.store.fhir_common import FhirRepository, SearchResult, error_entry

FHIR_REPOSITORY: web.AppKey[FhirRepository] = web.AppKey("fhir_repository", FhirRepository)
# Resource entries of the CapabilityStatement from routes that serve a type their own way
# (documents, AuditEvent): registered with the routes, so the statement follows what is served.
CAPABILITIES: web.AppKey[dict[str, dict[str, Any]]] = web.AppKey("capabilities", dict)


# System-level operations the CapabilityStatement lists (set by the routes that serve them).
OPERATIONS: web.AppKey[list[dict[str, Any]]] = web.AppKey("fhir_operations", list)


def add_capability(app: web.Application, entry: dict[str, Any]) -> None:
    if CAPABILITIES not in app:
        app[CAPABILITIES] = {}
    app[CAPABILITIES][entry["type"]] = entry


JSON_TYPES = (FHIR_JSON, "application/json")
INTERACTIONS = ("read", "vread", "history-instance", "search-type", "create", "update", "delete")
_VERSION_INTERACTIONS = ("vread", "history-instance")
# Result parameters with no effect on a JSON-only server.
_IGNORED_PARAMS = ("_format", "_pretty")


class Gone(HttpError):
    """The resource existed and was deleted."""

    http_status = 410
    fhir_issue_code = "deleted"


# -- resource types and validation ---------------------------------------------------------------


def is_resource_type(type_: str) -> bool:
    return model_of(type_) is not None


def _require_type(type_: str) -> None:
    if not is_resource_type(type_):
        raise UnsupportedResourceType(f"resource type {type_!r} is not supported", location="type")


@functools.cache
def resource_types() -> tuple[str, ...]:
    """Every concrete resource type R4B knows (imports every model once: run it off the loop)."""
    from fhir.resources.R4B import fhirtypes

    names = sorted(n[:-4] for n in dir(fhirtypes) if n.endswith("Type") and n[:1].isupper())
    return tuple(n for n in names if is_resource_type(n))


def _code_issues(model: Any, where: str) -> Iterator[tuple[str, str, str]]:
    """Codes outside a closed short list, on a parsed model. ``validate_resource`` checks codes on
    the JSON itself (gateway.fhir.validation); this is kept for the reference implementation of
    tests/mapping/test_structure.py."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name, None)
        if value is None:
            continue
        allowed = closed_codes(info)
        key = info.alias or name
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            here = f"{where}.{key}[{i}]" if isinstance(value, list) else f"{where}.{key}"
            if isinstance(item, str):
                if allowed is not None and item not in allowed:
                    yield ("code-invalid", f"{item!r} is not one of {' | '.join(allowed)}", here)
            elif hasattr(type(item), "model_fields"):
                yield from _code_issues(item, here)


# -- request and response helpers -----------------------------------------------------------------


def _repository(request: web.Request) -> FhirRepository:
    return request.app[FHIR_REPOSITORY]


def _base(request: web.Request) -> str:
    return f"{request.url.origin()}/fhir"


def fhir_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type=FHIR_JSON, headers=headers)


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_type not in JSON_TYPES:
        raise UnsupportedMediaType(f"send {' or '.join(JSON_TYPES)}, not {request.content_type or 'nothing'}")
    raw = await request.read()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"invalid JSON: {exc.msg} at position {exc.pos}") from exc
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


async def _resource_body(request: web.Request, type_: str) -> dict[str, Any]:
    data = await _body(request)
    if data.get("resourceType") != type_:
        raise BadRequest(f"resourceType must be {type_}", location="resourceType")
    # The quick check takes microseconds: on the loop. Only the models' slow verdict (and its
    # messages) is CPU work worth a thread, kept off the loop that also answers MLLP senders.
    # Required bindings checked: what /fhir stores is read back by clients that hold them.
    if not conforms_fast(data, bindings=Bindings.REQUIRED):
        await asyncio.to_thread(validate_resource, data, bindings=Bindings.REQUIRED)
    return data


def _version_headers(resource: Mapping[str, Any]) -> dict[str, str]:
    meta = resource.get("meta") or {}
    headers = {"ETag": f'W/"{meta.get("versionId", "")}"'}
    last = meta.get("lastUpdated")
    if isinstance(last, str):
        headers["Last-Modified"] = format_datetime(datetime.fromisoformat(last), usegmt=True)
    return headers


def location(request: web.Request, resource: Mapping[str, Any]) -> str:
    """Where a written resource is read again: its version (vread) when versions are served."""
    base = f"{_base(request)}/{resource['resourceType']}/{resource['id']}"
    if VERSIONS not in request.app:
        return base
    return f"{base}/_history/{(resource.get('meta') or {}).get('versionId', '')}"


def answer_locations(request: web.Request, answer: dict[str, Any]) -> dict[str, Any]:
    """A transaction answer's ``Type/id/_history/N`` locations, as ``Type/id`` when versions are
    not served (every link the server gives must answer)."""
    if VERSIONS in request.app:
        return answer
    for entry in answer.get("entry") or ():
        response = entry.get("response") if isinstance(entry, dict) else None
        if isinstance(response, dict) and isinstance(loc := response.get("location"), str):
            response["location"] = loc.split("/_history/", 1)[0]
    return answer


def _written(
    request: web.Request, resource: dict[str, Any], created: bool, *, status: int | None = None
) -> web.Response:
    headers = _version_headers(resource)
    headers["Location"] = location(request, resource)
    return fhir_response(resource, status or (201 if created else 200), headers)


Handler = Callable[[web.Request], Awaitable[web.Response]]


def _reports_issues(handler: Handler) -> Handler:
    """Let a validation failure list all its issues (the shared middleware renders one)."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except InvalidResource as exc:
            return fhir_response(exc.outcome(), exc.http_status)

    return wrapped


# -- routes ----------------------------------------------------------------------------------------


def add_fhir_routes(app: web.Application, repository: FhirRepository) -> None:
    app[FHIR_REPOSITORY] = repository
    router = app.router
    router.add_get("/fhir/metadata", metadata)
    router.add_post("/fhir", _reports_issues(bundle))
    router.add_get("/fhir/{type}", search)
    router.add_post("/fhir/{type}", _reports_issues(create))
    router.add_put("/fhir/{type}", _reports_issues(conditional_update))
    router.add_get("/fhir/{type}/{id}", read)
    router.add_put("/fhir/{type}/{id}", _reports_issues(update))
    router.add_delete("/fhir/{type}/{id}", delete)
    router.add_get("/fhir/{type}/{id}/_history", history)
    router.add_get("/fhir/{type}/{id}/_history/{vid}", vread)


async def metadata(request: web.Request) -> web.Response:
    statement = dict(await capability_statement())
    statement["implementation"] = {"description": "Passerelle FHIR repository", "url": _base(request)}
    served = request.app.get(CAPABILITIES) or {}
    if served or VERSIONS not in request.app:
        rest = dict(statement["rest"][0])
        rest["resource"] = [served.get(r["type"], r) for r in rest["resource"]]
        if VERSIONS not in request.app:  # no version reader: vread and history are not served
            rest["resource"] = [_without_versions(r) for r in rest["resource"]]
        if "DocumentReference" in served:
            rest["interaction"] = [
                {
                    "code": "transaction",
                    "documentation": "ITI-65 Provide Document Bundle when it holds documents",
                },
                {"code": "batch"},
            ]
        statement["rest"] = [rest]
    if OPERATIONS in request.app:
        statement["rest"] = [{**statement["rest"][0], "operation": request.app[OPERATIONS]}]
    return fhir_response(statement)


async def read(request: web.Request) -> web.Response:
    type_, id_ = request.match_info["type"], request.match_info["id"]
    _require_type(type_)
    resource = await scoped_read(request, type_, id_)
    return fhir_response(resource, headers=_version_headers(resource))


# -- versions (vread, history) ---------------------------------------------------------------------


class VersionReader(Protocol):
    """Reads the versions the repository keeps (the document store does, on both built-in backends)."""

    async def versions(self, type_: str, id_: str) -> list[Version]: ...


VERSIONS: web.AppKey[VersionReader] = web.AppKey("versions", VersionReader)
_MAX_HISTORY = 500


async def _versions_seen(request: web.Request, type_: str, id_: str) -> list[Version]:
    """The versions of ``type_/id_`` the caller may see, newest first; 404 when there is none.

    A caller that patient scope or document masking limits sees the versions of what it may read
    now (the current version decides, as a read would), and of those only the ones inside its
    compartment; a List's entries naming hidden documents are left out of every version.
    """
    _require_type(type_)
    reader = request.app.get(VERSIONS)
    if reader is None or not ID_RE.fullmatch(id_):
        raise NotFound(f"{type_}/{id_} has no version history here")
    repo = _repository(request)
    compartment = await scope.compartment_of(request, repo, type_)
    limited = compartment is not None or (
        type_ in scope.DOCUMENT_TYPES and scope.is_limited(caller_of(request))
    )
    if limited:
        current = await repo.read(type_, id_)
        if current is None or not await scope.may_see(request, current, compartment):
            raise NotFound(f"{type_}/{id_} is not known")
    seen: list[Version] = []
    for version in await reader.versions(type_, id_):
        body = version.body
        if limited and body is not None:
            if compartment is not None and not compartment.holds(body):
                continue
            shown = await scope.shown(request, body)
            if shown is None:
                continue
            body = dict(shown)
        elif limited:
            continue  # a deletion says nothing a limited caller may be told
        seen.append(Version(version.version, version.last_updated, body))
    if not seen:
        raise NotFound(f"{type_}/{id_} is not known")
    return seen


async def vread(request: web.Request) -> web.Response:
    """``GET /fhir/{type}/{id}/_history/{vid}``: that version (410 when it is a deletion)."""
    type_, id_, vid = request.match_info["type"], request.match_info["id"], request.match_info["vid"]
    versions = await _versions_seen(request, type_, id_)
    found = next((v for v in versions if str(v.version) == vid), None)
    if found is None:
        raise NotFound(f"{type_}/{id_} has no version {vid}")
    if found.body is None:
        raise Gone(f"version {vid} of {type_}/{id_} is its deletion")
    return fhir_response(found.body, headers=_version_headers(found.body))


async def history(request: web.Request) -> web.Response:
    """``GET /fhir/{type}/{id}/_history``: a history Bundle, newest version first."""
    type_, id_ = request.match_info["type"], request.match_info["id"]
    unknown = sorted(set(request.query) - {"_count", "_offset", *_IGNORED_PARAMS})
    if unknown:
        raise BadRequest(f"unsupported history parameter {unknown[0]!r}", location=unknown[0])
    count = _bounded(request, "_count", DEFAULT_COUNT, _MAX_HISTORY)
    offset = _bounded(request, "_offset", 0, 10**9)
    versions = await _versions_seen(request, type_, id_)
    base = _base(request)
    entries = []
    for v in versions[offset : offset + count]:
        entry: dict[str, Any] = {"fullUrl": f"{base}/{type_}/{id_}"}
        if v.body is not None:
            entry["resource"] = v.body
        method, url = ("POST", type_) if v.version == 1 else ("PUT", f"{type_}/{id_}")
        if v.body is None:
            method, url = "DELETE", f"{type_}/{id_}"
        entry["request"] = {"method": method, "url": url}
        status = {"POST": "201 Created", "PUT": "200 OK", "DELETE": "204 No Content"}[method]
        entry["response"] = {"status": status, "etag": f'W/"{v.version}"', "lastModified": v.last_updated}
        entries.append(entry)
    links = [{"relation": "self", "url": str(request.url)}]
    if offset + count < len(versions):
        query = urlencode([("_count", count), ("_offset", offset + count)])
        links.append({"relation": "next", "url": f"{base}/{type_}/{id_}/_history?{query}"})
    bundle = {"resourceType": "Bundle", "type": "history", "total": len(versions), "link": links}
    bundle["entry"] = entries
    return fhir_response(bundle)


def _bounded(request: web.Request, name: str, default: int, high: int) -> int:
    raw = request.query.get(name, "")
    if raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 10:
        raise BadRequest(f"{name} must be a non-negative integer", location=name)
    return min(int(raw), high)


async def scoped_read(request: web.Request, type_: str, id_: str) -> dict[str, Any]:
    """A read within what the caller may see (gateway.http.scope): outside it, as if absent."""
    repo = _repository(request)
    compartment = await scope.compartment_of(request, repo, type_)
    resource = await repo.read(type_, id_) if ID_RE.fullmatch(id_) else None
    if resource is not None and compartment is not None and not compartment.holds(resource):
        resource = None
    if resource is None:
        # 410 would tell a patient that a resource they may not see existed.
        if compartment is None and ID_RE.fullmatch(id_) and await repo.is_deleted(type_, id_):
            raise Gone(f"{type_}/{id_} was deleted")
        raise NotFound(f"{type_}/{id_} is not known")
    return resource


async def search(request: web.Request) -> web.Response:
    type_ = request.match_info["type"]
    _require_type(type_)
    params = [(k, v) for k, v in request.query.items() if k not in _IGNORED_PARAMS]
    result = await scoped_search(request, type_, params)
    return fhir_response(searchset(request, type_, params, result))


async def scoped_search(request: web.Request, type_: str, params: list[tuple[str, str]]) -> SearchResult:
    """A search narrowed in the query itself (totals and pages count only what the caller may see)."""
    repo = _repository(request)
    compartment = await scope.compartment_of(request, repo, type_)
    query = list(params)
    if compartment is not None:
        compartment.check(type_, params)
        query.append(compartment.criterion(type_))
    result = await repo.search(type_, query, count=DEFAULT_COUNT)
    return await scope.visible_included(request, result, compartment)


def searchset(
    request: web.Request, type_: str, params: list[tuple[str, str]], result: SearchResult
) -> dict[str, Any]:
    base = _base(request)
    kept = [(k, v) for k, v in params if k not in ("_count", "_offset")]

    def page(offset: int) -> str:
        return f"{base}/{type_}?{urlencode([*kept, ('_count', result.count), ('_offset', offset)])}"

    links = [{"relation": "self", "url": str(request.url)}]
    if result.count and result.offset + result.count < result.total:
        links.append({"relation": "next", "url": page(result.offset + result.count)})
    if result.count and result.offset > 0:
        links.append({"relation": "previous", "url": page(max(result.offset - result.count, 0))})
    entries = [
        {"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": mode}}
        for mode, found in (("match", result.matches), ("include", result.included))
        for r in found
    ]
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": result.total,
        "link": links,
        "entry": entries,
    }


async def create(request: web.Request) -> web.Response:
    type_ = request.match_info["type"]
    _require_type(type_)
    scope.check_writer(request)
    resource = await _resource_body(request, type_)
    await scope.check_document_write(request, _repository(request), type_, resource=resource)
    condition = request.headers.get("If-None-Exist") or None

    async def write() -> web.Response:
        stored, created = await _repository(request).create(resource, if_none_exist=condition)
        return _written(request, stored, created)

    return await routed(request, resource, "POST", write)  # a channel may route it (journaled first)


async def update(request: web.Request) -> web.Response:
    type_, id_ = request.match_info["type"], request.match_info["id"]
    _require_type(type_)
    scope.check_writer(request)
    resource = await _resource_body(request, type_)
    if resource.get("id", id_) != id_:
        raise BadRequest("the resource id does not match the URL id", location=f"{type_}.id")
    await scope.check_document_write(request, _repository(request), type_, id_=id_, resource=resource)
    if_match = request.headers.get("If-Match") or None

    async def write() -> web.Response:
        stored, created = await _repository(request).update(type_, id_, resource, if_match=if_match)
        return _written(request, stored, created)

    return await routed(request, resource, "PUT", write)


async def conditional_update(request: web.Request) -> web.Response:
    type_ = request.match_info["type"]
    _require_type(type_)
    if not request.query_string:
        raise BadRequest("PUT to a type needs search criteria (or use PUT Type/id)")
    scope.check_writer(request)
    resource = await _resource_body(request, type_)
    criteria = parse_qsl(request.query_string, keep_blank_values=True)
    await scope.check_document_write(request, _repository(request), type_, query=criteria, resource=resource)

    async def write() -> web.Response:
        stored, created = await _repository(request).conditional_update(type_, request.query_string, resource)
        return _written(request, stored, created)

    return await routed(request, resource, "PUT", write)


async def delete(request: web.Request) -> web.Response:
    type_, id_ = request.match_info["type"], request.match_info["id"]
    _require_type(type_)
    scope.check_writer(request)
    await scope.check_document_write(request, _repository(request), type_, id_=id_)
    deleted = ID_RE.fullmatch(id_) is not None and await _repository(request).delete(type_, id_)
    text = f"{type_}/{id_} deleted" if deleted else f"{type_}/{id_} was not there: nothing to delete"
    return fhir_response(information(text))


async def bundle(request: web.Request) -> web.Response:
    data = await _body(request)
    if data.get("resourceType") != "Bundle":
        raise BadRequest("POST /fhir takes a Bundle", location="resourceType")
    kind = data.get("type")
    if kind not in ("transaction", "batch"):
        raise BadRequest("Bundle.type must be transaction or batch", location="Bundle.type")
    entries = data.get("entry") or []
    if not isinstance(entries, list):
        raise BadRequest("Bundle.entry must be a list", location="Bundle.entry")
    repo = _repository(request)
    caller = caller_of(request)
    await _check_bundle_entries(request, entries)
    if caller is not None and caller.role is Role.PATIENT:
        return await _read_bundle(request, kind, entries)  # only GET entries come this far
    # As for one resource: the compiled check on the loop, the models on a thread when it says no.
    if all(_fast_valid(e) for e in entries):
        failed: dict[int, dict[str, Any]] = {}
    else:
        failed = await asyncio.to_thread(_validate_entries, entries, kind == "transaction")

    async def write() -> web.Response:
        if kind == "transaction":
            answer = await _visible_answer(request, await repo.transaction(data))
            return fhir_response(answer_locations(request, answer))
        # A batch: invalid entries get their own error responses; the others still run.
        kept = [e for i, e in enumerate(entries) if i not in failed]
        answer = answer_locations(
            request, await _visible_answer(request, await repo.transaction({**data, "entry": kept}))
        )
        done = iter(answer.get("entry", []))
        answer["entry"] = [failed[i] if i in failed else next(done) for i in range(len(entries))]
        return fhir_response(answer)

    # A batch's invalid entries are answered in the batch-response and not routed.
    return await routed(request, data, "POST", write, refused=failed)


def _entry_request(entry: Any) -> tuple[str, str]:
    """(method, url) of a Bundle entry, empty when malformed (the repository reports those)."""
    req = entry.get("request") if isinstance(entry, dict) else None
    method = req.get("method") if isinstance(req, dict) else None
    url = req.get("url") if isinstance(req, dict) else None
    return (method, url) if isinstance(method, str) and isinstance(url, str) else ("", "")


async def _check_bundle_entries(request: web.Request, entries: list[Any]) -> None:
    """The rules of the single-resource routes, entry by entry, before anything runs."""
    limited = scope.is_limited(caller_of(request))
    for i, entry in enumerate(entries):
        method, url = _entry_request(entry)
        path, _, query = url.lstrip("/").partition("?")
        type_, _, id_ = path.partition("/")
        where = f"Bundle.entry[{i}].request"
        try:
            if method in ("GET", "HEAD"):
                if limited and type_ in scope.DOCUMENT_TYPES:
                    raise Forbidden(
                        "read documents with DocumentReference?, List? and Binary/{id} (ITI-67/66/68),"
                        " not inside a Bundle"
                    )
                continue
            scope.check_writer(request)
            resource = entry.get("resource") if isinstance(entry, dict) else None
            await scope.check_document_write(
                request,
                _repository(request),
                type_,
                id_=id_ or None,
                query=parse_qsl(query, keep_blank_values=True) if query else None,
                resource=resource if isinstance(resource, dict) else None,
            )
        except PasserelleError as exc:
            exc.location = where + ".url" if exc.location is None else exc.location
            raise


async def _visible_answer(request: web.Request, answer: dict[str, Any]) -> dict[str, Any]:
    """``_include``d documents a limited caller may not see leave the GET entries' searchsets."""
    if not scope.is_limited(caller_of(request)):
        return answer
    for entry in answer.get("entry") or ():
        found = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(found, dict) and found.get("type") == "searchset":
            found["entry"] = [
                e
                for e in found.get("entry") or ()
                if (e.get("search") or {}).get("mode") != "include"
                or await scope.may_see(request, e.get("resource") or {}, None)
            ]
    return answer


async def _read_bundle(request: web.Request, kind: str, entries: list[Any]) -> web.Response:
    """A patient's Bundle (GET entries only), each read or search scoped as on its own route."""
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        try:
            out.append(await _read_entry(request, entry))
        except PasserelleError as exc:
            exc.location = exc.location or f"Bundle.entry[{i}].request.url"
            if kind == "transaction":
                raise
            out.append(error_entry(exc))
    return fhir_response({"resourceType": "Bundle", "type": f"{kind}-response", "entry": out})


async def _read_entry(request: web.Request, entry: Any) -> dict[str, Any]:
    _, url = _entry_request(entry)
    path, _, query = url.lstrip("/").partition("?")
    segments = path.split("/")
    if not url or len(segments) > 2 or "://" in path:
        raise BadRequest("request.url must be Type, Type/id or Type?query")
    type_ = segments[0]
    _require_type(type_)
    if len(segments) == 2:
        resource = await scoped_read(request, type_, segments[1])
        meta = resource.get("meta") or {}
        response = {"status": "200 OK", "etag": f'W/"{meta.get("versionId", "")}"'}
        if "lastUpdated" in meta:
            response["lastModified"] = meta["lastUpdated"]
        return {"resource": resource, "response": response}
    params = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in _IGNORED_PARAMS]
    result = await scoped_search(request, type_, params)
    found = [{"resource": r, "search": {"mode": "match"}} for r in result.matches]
    found += [{"resource": r, "search": {"mode": "include"}} for r in result.included]
    bundle = {"resourceType": "Bundle", "type": "searchset", "total": result.total, "entry": found}
    return {"resource": bundle, "response": {"status": "200 OK"}}


def _validate_entries(entries: list[Any], atomic: bool) -> dict[int, dict[str, Any]]:
    """Batch: the error entry of each invalid entry. Transaction: the first invalid one raises."""
    failed: dict[int, dict[str, Any]] = {}
    for i, entry in enumerate(entries):
        try:
            _validate_entry(i, entry)
        except InvalidResource as exc:
            if atomic:
                raise
            failed[i] = error_entry(exc, exc.outcome())
        except HttpError as exc:
            if atomic:
                raise
            failed[i] = error_entry(exc)
    return failed


def _fast_valid(entry: Any) -> bool:
    """An entry the compiled check accepts (or one without a resource: the repository's to judge)."""
    if not isinstance(entry, dict) or entry.get("resource") is None:
        return True
    resource = entry["resource"]
    # Required bindings: a Bundle entry is held to what a single write is (_resource_body).
    return isinstance(resource, dict) and conforms_fast(resource, bindings=Bindings.REQUIRED)


def _validate_entry(index: int, entry: Any) -> None:
    if not isinstance(entry, dict) or entry.get("resource") is None:
        return  # structure problems are the repository's to report, with the entry index
    resource = entry["resource"]
    where = f"Bundle.entry[{index}].resource"
    if not isinstance(resource, dict):
        raise BadRequest(f"{where} must be an object", location=where)
    validate_resource(resource, where, bindings=Bindings.REQUIRED)  # as a single write (_resource_body)


# -- CapabilityStatement ----------------------------------------------------------------------------


def _without_versions(entry: dict[str, Any]) -> dict[str, Any]:
    interactions = [i for i in entry.get("interaction", ()) if i.get("code") not in _VERSION_INTERACTIONS]
    return {**entry, "interaction": interactions, "readHistory": False}


_SEARCH_PARAMS: dict[str, tuple[str, str]] = {
    "_id": ("token", "Logical id of the resource"),
    "_lastUpdated": ("date", "meta.lastUpdated; prefixes eq ge gt le lt"),
    "identifier": ("token", "system|value, |value or value"),
    "patient": ("reference", "Type/id or id; also matched from subject when it is a Patient"),
    "subject": ("reference", "Type/id or id"),
    "encounter": ("reference", "Type/id or id"),
}


def _resource_capability(type_: str) -> dict[str, Any]:
    model = model_of(type_)
    assert model is not None
    fields = {info.alias or name for name, info in model.model_fields.items()}
    params = ["_id", "_lastUpdated"] + [p for p in ("identifier", *REFERENCE_PARAMS) if p in fields]
    if "subject" in fields and "patient" not in params:
        params.append("patient")
    chains = [c for c in CHAINED_PARAMS if c.split(".")[0] in params]
    search_params = []
    for name in params:
        kind, doc = _SEARCH_PARAMS[name]
        if chained := [c for c in chains if c.startswith(name + ".")]:
            doc += f"; chained: {', '.join(chained)} (system|value of the Patient's identifier)"
        search_params.append({"name": name, "type": kind, "documentation": doc})
    return {
        "type": type_,
        "interaction": [{"code": code} for code in INTERACTIONS],
        "versioning": "versioned",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalUpdate": True,
        "conditionalDelete": "not-supported",
        "searchInclude": [f"{type_}:{p}" for p in REFERENCE_PARAMS if p in params],
        "searchParam": search_params,
    }


@functools.cache
def _capability_statement() -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),  # when this statement was generated
        "publisher": "Passerelle",
        "kind": "instance",
        "software": {"name": "Passerelle"},
        "fhirVersion": "4.0.1",
        "format": ["json", FHIR_JSON],
        "rest": [
            {
                "mode": "server",
                "documentation": "_count (max 500), _offset, _sort=_lastUpdated|-_lastUpdated, _include",
                "resource": [_resource_capability(t) for t in resource_types()],
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
            }
        ],
    }


async def capability_statement() -> Mapping[str, Any]:
    # The first call imports every R4B model (about a second): keep it off the event loop.
    return await asyncio.to_thread(_capability_statement)
