"""FHIR Bulk Data Access (v2) export: ``$export`` at system, Patient and Group level.

The asynchronous request pattern: the kick-off (``Prefer: respond-async``) answers 202 with a
status URL in ``Content-Location``; polling it answers 202 (``Retry-After``, ``X-Progress``) while the
job runs, then 200 with the completion manifest; ``DELETE`` on it cancels the job and removes its
files. The files are served here, under /fhir, to the caller whose token started the export only
(another caller gets 404, as for an unknown job), and removed ``export.file_ttl_s`` after the job
ends.

What a caller receives follows the /fhir rules (gateway.http.scope): a patient gets their own
compartment, a professional never a document masked from professionals (nor a List entry naming
one), operators and admins everything. Kick-off, download and cancel are written to the audit
trail (refusals too) before the answer goes out; an access that cannot be audited is refused (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.core.errors import BadRequest, Forbidden, NotFound, PasserelleError, StoreError
from gateway.core.logging import get_logger
from gateway.fhir.outcome import information
from gateway.fhir.search import date_range
from gateway.http import scope
from gateway.http.audit import AUDIT
from gateway.http.auth import Caller, Role, require
from gateway.http.documents import DOCUMENT_STORE, actor_for
from gateway.http.fhir import OPERATIONS, fhir_response, is_resource_type
from gateway.http.outcome import error_response
from gateway.store.audit import (
    INTERACTION,
    MINOR_FAILURE,
    REST,
    SERIOUS_FAILURE,
    SUCCESS,
    event,
    query_entity,
)
from gateway.store.bulk import (
    DEFAULT_MAX_RUNNING,
    DEFAULT_TTL_S,
    NDJSON,
    OUTPUT_FORMATS,
    Exporter,
    ExportJob,
    ExportRequest,
    JobStatus,
    check_open,
)
from gateway.store.fhir_common import FhirRepository

log = get_logger("passerelle.bulk")

EXPORTER: web.AppKey[Exporter] = web.AppKey("exporter", Exporter)
_SWEEPER: web.AppKey[asyncio.Task[None]] = web.AppKey("export_sweeper", asyncio.Task)
POLL = "/fhir/$export-poll"
FILES = "/fhir/$export-file"
EXPORT_SYSTEM = "urn:passerelle:export"
# A Patient or Group export holds the compartment's types, and the Binaries of its documents.
COMPARTMENT = frozenset({"Patient", "Binary", *scope.COMPARTMENT_TYPES})
_KNOWN_PARAMS = frozenset({"_type", "_since", "_outputFormat", "_format"})
RETRY_AFTER_S = 2

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _outcome(status: int) -> str:
    if status < 400:
        return SUCCESS
    return MINOR_FAILURE if status < 500 else SERIOUS_FAILURE


def _audited(action: str, what: str) -> Callable[[Handler], Handler]:
    """Record the handler's outcome (success or refusal) in the audit trail before answering."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(request: web.Request) -> web.StreamResponse:
            failure: PasserelleError | None = None
            response: web.StreamResponse | None = None
            try:
                response = await handler(request)
                status = response.status
            except PasserelleError as exc:
                failure, status = exc, exc.http_status
            audit = request.app.get(AUDIT)
            if audit is not None:
                entities: list[dict[str, Any]] = []
                job = request.get(_JOB) or request.match_info.get("job")
                if job:
                    entity: dict[str, Any] = {"what": {"identifier": {"system": EXPORT_SYSTEM, "value": job}}}
                    if "name" in request.match_info:
                        entity["name"] = request.match_info["name"]
                    entities.append(entity)
                if request.query_string:
                    entities.append(query_entity(request.query_string))
                caller = request.get(_CALLER)
                try:
                    await audit.write(
                        event(
                            type_=REST,
                            subtype={"system": INTERACTION, "code": "operation"},
                            action=action,
                            outcome=_outcome(status),
                            who=caller.subject if caller is not None else "anonymous",
                            role=caller.role.value if caller is not None else None,
                            address=request.remote,
                            description=what,
                            entities=entities,
                        )
                    )
                except StoreError as exc:
                    log.error("audit_write_failed", path_kind="$export", error=exc.message)
                    if failure is None:
                        return error_response(503, "transient", "the access could not be audited; try again")
            if failure is not None:
                raise failure
            assert response is not None
            return response

        return run

    return wrap


_JOB: web.RequestKey[str] = web.RequestKey("passerelle.export_job", str)
_CALLER: web.RequestKey[Caller] = web.RequestKey("passerelle.export_caller", Caller)


def _caller(request: web.Request) -> Caller:
    caller = require(request, *Role)
    request[_CALLER] = caller
    return caller


def _prefers_async(request: web.Request) -> tuple[bool, bool]:
    """(respond-async asked?, handling=lenient asked?) from the Prefer header(s)."""
    tokens = {
        part.strip().lower().replace(" ", "")
        for header in request.headers.getall("Prefer", [])
        for part in header.replace(";", ",").split(",")
    }
    return "respond-async" in tokens, "handling=lenient" in tokens


def _types(request: web.Request) -> tuple[str, ...] | None:
    raw = [v for value in request.query.getall("_type", []) for v in value.split(",") if v.strip()]
    if not raw:
        return None
    types = tuple(dict.fromkeys(t.strip() for t in raw))
    for type_ in types:
        if not is_resource_type(type_):
            raise BadRequest(f"_type: {type_!r} is not a FHIR R4B resource type", location="_type")
    return types


def _since(request: web.Request) -> str | None:
    raw = request.query.get("_since")
    if not raw:
        return None
    text = raw.replace(" ", "+")  # an unencoded "+02:00" arrives as " 02:00"
    if "T" not in text:
        raise BadRequest("_since must be an instant, e.g. 2024-05-14T10:00:00Z", location="_since")
    return date_range(text, "_since")[0]


def _group_members(group: Mapping[str, Any]) -> frozenset[str]:
    out = set()
    for member in group.get("member") or ():
        ref = ((member or {}).get("entity") or {}).get("reference") if isinstance(member, dict) else None
        if isinstance(ref, str) and ref.startswith("Patient/") and "/" not in ref[8:]:
            out.add(ref[8:])
    return frozenset(out)


async def _kick_off(request: web.Request, level: str) -> web.StreamResponse:
    caller = _caller(request)
    exporter = request.app[EXPORTER]
    wants_async, lenient = _prefers_async(request)
    if not wants_async:
        raise BadRequest("a bulk export needs the header Prefer: respond-async", location="Prefer")
    unknown = sorted(set(request.query) - _KNOWN_PARAMS)
    if unknown and not lenient:
        raise BadRequest(
            f"{unknown[0]} is not supported (supported: _type, _since, _outputFormat;"
            " Prefer: handling=lenient ignores the others)",
            location=unknown[0],
        )
    fmt = request.query.get("_outputFormat", NDJSON).replace(" ", "+")
    if fmt not in OUTPUT_FORMATS:
        raise BadRequest(
            f"_outputFormat {fmt!r} is not supported; use {', '.join(sorted(OUTPUT_FORMATS))}",
            location="_outputFormat",
        )
    types, since = _types(request), _since(request)
    repository = exporter.repository
    patients: frozenset[str] | None = None
    if caller.role is Role.PATIENT:
        compartment = await scope.compartment_of(request, repository, "Patient")
        assert compartment is not None
        patients = compartment.patients
    if level == "group":
        if caller.role is Role.PATIENT:  # a Group is not part of their record; nor is its existence
            raise Forbidden("a patient exports their own record: /fhir/Patient/$export", location="id")
        group_id = request.match_info["id"]
        group = await repository.read("Group", group_id)
        if group is None:
            raise NotFound(f"Group/{group_id} is not known", location="id")
        patients = _group_members(group)
    if level != "system" or patients is not None:
        outside = [t for t in types or () if t not in COMPARTMENT]
        if outside:
            error = Forbidden if caller.role is Role.PATIENT and level == "system" else BadRequest
            raise error(f"_type: {outside[0]} is not part of a patient's record", location="_type")
        types = types or (*sorted(COMPARTMENT - {"Binary"}), "Binary")
    job = await exporter.start(
        ExportRequest(
            owner=caller.subject,
            request=str(request.url),
            types=types,
            since=since,
            patients=patients,
            actor=actor_for(caller),
        )
    )
    request[_JOB] = job.id
    status_url = f"{request.url.origin()}{POLL}/{job.id}"
    return fhir_response(information("export started"), 202, headers={"Content-Location": status_url})


@_audited("E", "bulk export kick-off (system)")
async def export_system(request: web.Request) -> web.StreamResponse:
    return await _kick_off(request, "system")


@_audited("E", "bulk export kick-off (Patient)")
async def export_patients(request: web.Request) -> web.StreamResponse:
    return await _kick_off(request, "patient")


@_audited("E", "bulk export kick-off (Group)")
async def export_group(request: web.Request) -> web.StreamResponse:
    return await _kick_off(request, "group")


def _job(request: web.Request, caller: Caller) -> ExportJob:
    job = request.app[EXPORTER].get(request.match_info["job"], caller.subject)
    if job is None:
        raise NotFound("no such export (unknown, expired, cancelled, or another caller's)")
    return job


async def status(request: web.Request) -> web.StreamResponse:
    job = _job(request, _caller(request))
    if job.status is JobStatus.RUNNING:
        headers = {"Retry-After": str(RETRY_AFTER_S), "X-Progress": job.progress()}
        return web.Response(status=202, headers=headers)
    if job.status is JobStatus.FAILED:
        return error_response(500, "exception", job.error or "the export failed")
    manifest = job.manifest(f"{request.url.origin()}{FILES}")
    return web.json_response(manifest, content_type="application/json")


@_audited("D", "bulk export cancelled")
async def cancel(request: web.Request) -> web.StreamResponse:
    job = _job(request, _caller(request))
    await request.app[EXPORTER].cancel(job)
    return fhir_response(information("export cancelled"), 202)


@_audited("R", "bulk export file download")
async def download(request: web.Request) -> web.StreamResponse:
    job = _job(request, _caller(request))
    path = request.app[EXPORTER].file(job, request.match_info["name"])
    if path is None:
        raise NotFound("no such file in this export")
    return web.FileResponse(path, headers={"Content-Type": NDJSON})


_OPERATIONS = [
    {"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"},
    {
        "name": "patient-export",
        "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export",
    },
    {
        "name": "group-export",
        "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export",
    },
]


def add_bulk_routes(
    app: web.Application, repository: FhirRepository, settings: Mapping[str, Any] | None
) -> None:
    """Register the $export routes (before every other /fhir route: ``/fhir/{type}`` would take
    them). ``settings``: ``directory`` (required), ``file_ttl_s``, ``max_running``; None: no export."""
    if settings is None:
        return
    exporter = Exporter(
        check_open(repository),
        Path(settings["directory"]),
        ttl_s=float(settings.get("file_ttl_s", DEFAULT_TTL_S)),
        max_running=int(settings.get("max_running", DEFAULT_MAX_RUNNING)),
    )
    app[EXPORTER] = exporter
    app[OPERATIONS] = _OPERATIONS
    router = app.router
    router.add_get("/fhir/$export", export_system)
    router.add_get("/fhir/Patient/$export", export_patients)
    router.add_get("/fhir/Group/{id}/$export", export_group)
    router.add_get(POLL + "/{job}", status)
    router.add_delete(POLL + "/{job}", cancel)
    router.add_get(FILES + "/{job}/{name}", download)

    async def start(app: web.Application) -> None:
        exporter.documents = app.get(DOCUMENT_STORE)  # set by the MHD routes, registered after these
        await asyncio.to_thread(exporter.clear_leftovers)
        app[_SWEEPER] = asyncio.create_task(exporter.sweep(), name="export-sweeper")

    async def stop(app: web.Application) -> None:
        sweeper = app.get(_SWEEPER)
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        await exporter.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
