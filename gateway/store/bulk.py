"""Everything out and back in: FHIR Bulk Data exports to NDJSON files, and their restore.

An export is a job: it reads the repository page by page (``scan``, a (type, id) cursor; or a
search per compartment), filters what its caller may not see (the document store's masking and
patient rules), and appends each page to one NDJSON file per resource type. Memory holds one page,
whatever the repository's size. Documents come out as DocumentReference, and their bytes as
Binary resources with ``data``. Files live in a directory of their own per job and are removed
``ttl`` seconds after the job ends (or when it is cancelled).

A restore writes resources exactly as exported (same id, ``meta.versionId``, ``meta.lastUpdated``),
through the repository's write transaction on either backend: a resource already stored with other
content is a conflict unless ``replace``; a Binary's bytes go back to the document store, and the
DocumentReferences are indexed again once everything they name is in.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import orjson

from gateway.config import ExportSettings
from gateway.core.errors import PasserelleError, StoreError, TooManyRequests
from gateway.core.logging import get_logger
from gateway.fhir.search import MAX_COUNT, date_range, instant
from gateway.store import fhir_common as common
from gateway.store.documents import (
    Actor,
    BaseDocumentStore,
    Blob,
    DocOps,
    index_document,
    is_unrestricted,
    known_blob,
)
from gateway.store.fhir_common import SCAN_PAGE, FhirRepository

log = get_logger("passerelle.bulk")

NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
DEFAULT_TTL_S = ExportSettings().file_ttl_s
DEFAULT_MAX_RUNNING = ExportSettings().max_running
DOCUMENT_TYPES = frozenset({"DocumentReference", "List", "Binary"})
# Patients named per compartment search: keeps the query's parameter list short.
_PATIENTS_PER_SEARCH = 100
_JOB_ID = re.compile(r"[0-9a-f]{32}")
_FILE_NAME = re.compile(r"[A-Z][A-Za-z]{0,63}\.ndjson")


@runtime_checkable
class Scanning(FhirRepository, Protocol):
    """A repository that can be read page by page (both built-in backends)."""

    async def scan(
        self,
        types: Sequence[str] | None = None,
        *,
        after: tuple[str, str] | None = None,
        since: str | None = None,
        limit: int = SCAN_PAGE,
    ) -> list[dict[str, Any]]: ...


class JobStatus(StrEnum):
    RUNNING = "in-progress"
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ExportRequest:
    """What was asked, and what the caller may receive."""

    owner: str  # the caller's subject: only it polls, downloads and cancels
    request: str  # the kick-off URL, as the manifest repeats it
    types: tuple[str, ...] | None  # None: every type the repository holds (never with patients)
    since: str | None = None  # an instant: only what changed after it
    patients: frozenset[str] | None = None  # Patient ids of the compartments; None: no limit
    actor: Actor = field(default_factory=Actor)  # the document store's view of the caller


@dataclass(slots=True)
class Output:
    type: str
    name: str
    count: int = 0


@dataclass(slots=True)
class ExportJob:
    id: str
    request: ExportRequest
    transaction_time: str
    directory: Path
    status: JobStatus = JobStatus.RUNNING
    outputs: list[Output] = field(default_factory=list)
    written: int = 0
    current: str = ""
    error: str | None = None
    ended: float | None = None  # monotonic time the job ended: files expire ttl after it
    task: asyncio.Task[None] | None = None

    def progress(self) -> str:
        where = f", reading {self.current}" if self.current else ""
        return f"{self.written} resources written{where}"

    def manifest(self, base_url: str) -> dict[str, Any]:
        """The completion manifest; file URLs below ``base_url``."""
        return {
            "transactionTime": self.transaction_time,
            "request": self.request.request,
            "requiresAccessToken": True,
            "output": [
                {"type": o.type, "url": f"{base_url}/{self.id}/{o.name}", "count": o.count}
                for o in self.outputs
                if o.count
            ],
            "error": [],
        }


def _now_instant() -> str:
    return instant(datetime.now(UTC))


class _Files:
    """The job's open NDJSON files, one per type, appended page by page."""

    def __init__(self, job: ExportJob) -> None:
        self.job = job
        self._open: dict[str, tuple[IO[bytes], Output]] = {}

    async def write(self, type_: str, resources: Sequence[dict[str, Any]]) -> None:
        if not resources:
            return
        if type_ not in self._open:
            output = Output(type_, f"{type_}.ndjson")
            path = self.job.directory / output.name
            # Opened here, not in a thread: a cancelled job must not leave a handle behind.
            self._open[type_] = (path.open("ab"), output)
            self.job.outputs.append(output)
        handle, output = self._open[type_]
        data = b"".join(orjson.dumps(r) + b"\n" for r in resources)
        await asyncio.to_thread(handle.write, data)
        output.count += len(resources)
        self.job.written += len(resources)

    def close(self) -> None:
        for handle, _ in self._open.values():
            handle.close()
        self._open.clear()


class Exporter:
    """Runs export jobs of one repository; keeps their files in ``directory`` for ``ttl_s``."""

    def __init__(
        self,
        repository: Scanning,
        directory: Path,
        *,
        documents: BaseDocumentStore | None = None,
        ttl_s: float = DEFAULT_TTL_S,
        max_running: int = DEFAULT_MAX_RUNNING,
        clock: Callable[[], float] = time.monotonic,
        page: int = SCAN_PAGE,
    ) -> None:
        self.repository = repository
        self.directory = directory
        self.documents = documents
        self.ttl_s = ttl_s
        self.max_running = max_running
        self.page = page
        self._clock = clock
        self._jobs: dict[str, ExportJob] = {}
        self._cleared = False

    def clear_leftovers(self) -> None:
        """Remove the files of a previous run: their jobs are gone with it, nobody may fetch them."""
        if self._cleared:
            return
        self._cleared = True
        if self.directory.is_dir():
            for child in self.directory.iterdir():
                if child.is_dir() and _JOB_ID.fullmatch(child.name):
                    shutil.rmtree(child, ignore_errors=True)

    async def start(self, request: ExportRequest) -> ExportJob:
        self.expire()
        mine = [j for j in self._jobs.values() if j.request.owner == request.owner]
        running = [j for j in mine if j.status is JobStatus.RUNNING]
        if len(running) >= self.max_running:
            raise TooManyRequests(
                f"{len(running)} exports of this caller are running; wait for one to end", retry_after=30
            )
        self.clear_leftovers()
        job_id = secrets.token_hex(16)  # unguessable: the status URL names it
        job = ExportJob(job_id, request, _now_instant(), self.directory / job_id)
        await asyncio.to_thread(job.directory.mkdir, parents=True, mode=0o700)
        self._jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job), name=f"export-{job.id}")
        return job

    def get(self, job_id: str, owner: str) -> ExportJob | None:
        """The job, for its owner only (another caller is told nothing, as for an unknown id)."""
        self.expire()
        job = self._jobs.get(job_id)
        return job if job is not None and job.request.owner == owner else None

    def file(self, job: ExportJob, name: str) -> Path | None:
        if job.status is not JobStatus.COMPLETE or not _FILE_NAME.fullmatch(name):
            return None
        if name not in {o.name for o in job.outputs}:
            return None
        path = job.directory / name
        return path if path.is_file() else None

    async def cancel(self, job: ExportJob) -> None:
        """Stop the job if it runs, and remove it and its files."""
        self._jobs.pop(job.id, None)
        if job.task is not None and not job.task.done():
            job.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job.task
        await asyncio.to_thread(shutil.rmtree, job.directory, True)

    def expire(self) -> list[str]:
        """Remove the jobs (and files) that ended more than ``ttl_s`` ago; their ids."""
        now = self._clock()
        gone = [j for j in self._jobs.values() if j.ended is not None and now - j.ended >= self.ttl_s]
        for job in gone:
            del self._jobs[job.id]
            shutil.rmtree(job.directory, ignore_errors=True)
        return [j.id for j in gone]

    async def sweep(self) -> None:
        """Expire jobs now and then, so that files go even when nobody polls."""
        while True:
            await asyncio.sleep(max(1.0, min(self.ttl_s / 4, 60.0)))
            self.expire()

    async def close(self) -> None:
        for job in list(self._jobs.values()):
            if job.task is not None and not job.task.done():
                await self.cancel(job)

    # -- the job itself --

    async def _run(self, job: ExportJob) -> None:
        files = _Files(job)
        try:
            if job.request.patients is None:
                await self._scan_all(job, files)
            else:
                await self._compartments(job, files, sorted(job.request.patients))
            job.status = JobStatus.COMPLETE
        except asyncio.CancelledError:
            raise
        except PasserelleError as exc:
            job.status, job.error = JobStatus.FAILED, exc.message
            log.error("export_failed", job=job.id, error=type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - the job fails, the gateway goes on
            job.status, job.error = JobStatus.FAILED, "the export failed"
            log.error("export_failed", job=job.id, error=type(exc).__name__)
        finally:
            files.close()
            job.current = ""
            job.ended = self._clock()
        log.info("export_ended", job=job.id, status=job.status.value, resources=job.written)

    async def _scan_all(self, job: ExportJob, files: _Files) -> None:
        if job.request.types is None:
            await self._scan(job, files, None)
            return
        for type_ in sorted(job.request.types):  # one type a pass: each page seeks the primary key
            await self._scan(job, files, [type_])

    async def _scan(self, job: ExportJob, files: _Files, types: list[str] | None) -> None:
        after: tuple[str, str] | None = None
        while True:
            page = await self.repository.scan(types, after=after, since=job.request.since, limit=self.page)
            if not page:
                return
            after = (str(page[-1]["resourceType"]), str(page[-1]["id"]))
            by_type: dict[str, list[dict[str, Any]]] = {}
            for resource in page:
                shown = await self._shown(job.request.actor, resource)
                if shown is not None:
                    by_type.setdefault(str(resource["resourceType"]), []).append(shown)
            for type_, resources in by_type.items():
                job.current = type_
                await files.write(type_, resources)
            if len(page) < self.page:
                return

    async def _compartments(self, job: ExportJob, files: _Files, patients: list[str]) -> None:
        """Patient compartments: each type searched by its patient reference, a few patients at a
        time; the Binaries of the documents found follow."""
        types = job.request.types or ()  # the caller names the compartment's types
        binaries: dict[str, None] = {}
        for type_ in types:
            if type_ == "Binary":
                continue
            job.current = type_
            # A resource naming patients of two chunks is found twice: written once. (One chunk: no need.)
            seen: set[str] | None = set() if len(patients) > _PATIENTS_PER_SEARCH else None
            for start in range(0, len(patients), _PATIENTS_PER_SEARCH):
                chunk = patients[start : start + _PATIENTS_PER_SEARCH]
                if type_ == "Patient":
                    criteria = [("_id", ",".join(chunk))]
                else:
                    criteria = [("patient", ",".join(f"Patient/{p}" for p in chunk))]
                if job.request.since is not None:
                    criteria.append(("_lastUpdated", f"gt{job.request.since}"))
                offset = 0
                while True:
                    found = await self.repository.search(type_, criteria, count=MAX_COUNT, offset=offset)
                    kept = []
                    for resource in found.matches:
                        if seen is not None:
                            if resource["id"] in seen:
                                continue
                            seen.add(str(resource["id"]))
                        shown = await self._shown(job.request.actor, resource)
                        if shown is None:
                            continue
                        kept.append(shown)
                        if type_ == "DocumentReference":
                            binaries.update(dict.fromkeys(binary_ids(shown)))
                    await files.write(type_, kept)
                    offset += len(found.matches)
                    if not found.matches or offset >= found.total:
                        break
        if "Binary" in types:
            job.current = "Binary"
            ids = list(binaries)
            for start in range(0, len(ids), self.page):
                kept = []
                for id_ in ids[start : start + self.page]:
                    body = await self.repository.read("Binary", id_)
                    shown = await self._shown(job.request.actor, body) if body is not None else None
                    if shown is not None:
                        kept.append(shown)
                await files.write("Binary", kept)

    async def _shown(self, actor: Actor, resource: dict[str, Any]) -> dict[str, Any] | None:
        """The resource as this caller may receive it: None when the document rules hide it."""
        type_ = resource.get("resourceType")
        if type_ not in DOCUMENT_TYPES:
            return resource
        restricted = not is_unrestricted(actor)
        id_ = str(resource.get("id"))
        docs = self.documents
        if docs is None:
            return None if restricted else resource
        if type_ == "DocumentReference":
            return resource if not restricted or await docs.read(id_, actor) is not None else None
        if type_ == "List":
            # Without the entries naming documents hidden from the caller; None when all are.
            return resource if not restricted else await docs.read_list(id_, actor)
        blob = await docs.retrieve(id_, actor)
        if blob is None:
            return None if restricted else resource
        return {**resource, "contentType": blob.content_type, "data": base64.b64encode(blob.data).decode()}


def binary_ids(document: dict[str, Any]) -> list[str]:
    """The ids of the Binaries a DocumentReference's attachments name."""
    out = []
    for content in document.get("content") or ():
        url = ((content or {}).get("attachment") or {}).get("url") if isinstance(content, dict) else None
        if isinstance(url, str):
            match = _BINARY_REF.search(url)
            if match:
                out.append(match[1])
    return out


_BINARY_REF = re.compile(r"(?:^|/)Binary/([A-Za-z0-9\-.]{1,64})$")


# -- restore ---------------------------------------------------------------------------------------


class Outcome(StrEnum):
    CREATED = "created"
    UNCHANGED = "unchanged"  # already stored with this very content, id and version
    REPLACED = "replaced"
    CONFLICT = "conflict"


async def _exported_form(ops: DocOps, type_: str, body: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored resource as an export writes it (a document Binary with its bytes)."""
    if body is None or type_ != "Binary":
        return body
    blob = await known_blob(ops, str(body.get("id")))
    if blob is None:
        return body
    return {**body, "contentType": blob.content_type, "data": base64.b64encode(blob.data).decode()}


async def _restore_one(
    tx: common.Transaction,
    ops: DocOps,
    resource: dict[str, Any],
    replace: bool,
    current: common.Row | None,
) -> Outcome:
    type_, id_ = str(resource["resourceType"]), str(resource["id"])
    meta = resource["meta"]
    version = int(meta["versionId"])
    instant = date_range(str(meta["lastUpdated"]), "meta.lastUpdated")[0]
    outcome = Outcome.CREATED
    if current is not None:
        stored = await _exported_form(ops, type_, current[2])
        if stored == resource and current[0] == version:
            return Outcome.UNCHANGED
        if not replace:
            return Outcome.CONFLICT
        # The imported version takes the place of the stored one, and of any later history.
        await ops.rows(
            "DELETE FROM resource_versions WHERE type=? AND id=? AND version_id>=?", (type_, id_, version)
        )
        await ops.rows("DELETE FROM search_index WHERE type=? AND id=?", (type_, id_))
        outcome = Outcome.REPLACED
    body = _stored_body(resource)  # the bytes of a Binary live in doc_blobs
    if body is not resource:
        blob = Blob(base64.b64decode(str(resource["data"])), resource.get("contentType"))
        blob.binary_id = id_
        await ops.store_blob(blob)
    now, tx.now = tx.now, instant  # the row keeps the exported instant, as meta.lastUpdated does
    try:
        await tx.store(type_, id_, version, body)
    finally:
        tx.now = now
    return outcome


def _stored_body(resource: dict[str, Any]) -> dict[str, Any]:
    """A restored resource as the repository keeps it (a Binary's bytes in the document store)."""
    if resource.get("resourceType") == "Binary" and "data" in resource:
        return {k: v for k, v in resource.items() if k != "data"}
    return resource


async def restore(
    store: BaseDocumentStore, resources: Sequence[dict[str, Any]], *, replace: bool = False
) -> list[Outcome]:
    """Write exported resources as they are, in one transaction; one outcome per resource.

    Each resource has been checked (``resourceType``, ``id``, ``meta.versionId`` and
    ``meta.lastUpdated``, ``data`` base64 on a Binary). DocumentReferences need ``reindex``
    once every resource they name is in."""

    async def run(tx: common.Transaction, ops: DocOps) -> list[Outcome]:
        keys = [(str(r["resourceType"]), str(r["id"])) for r in resources]
        rows = await tx.fetch_many(keys)  # read (and locked) at once: a round trip, not one each
        outcomes = []
        for key, resource in zip(keys, resources, strict=True):
            outcome = await _restore_one(tx, ops, resource, replace, rows.get(key))
            if outcome in (Outcome.CREATED, Outcome.REPLACED):  # the same id later in the batch
                rows[key] = (int(resource["meta"]["versionId"]), False, _stored_body(resource))
            outcomes.append(outcome)
        return outcomes

    outcomes: list[Outcome] = await store._writing(run)
    return outcomes


async def reindex(store: BaseDocumentStore, document_ids: Sequence[str]) -> int:
    """Write the document index of restored DocumentReferences (masking, patient, tokens)."""

    async def run(tx: common.Transaction, ops: DocOps) -> int:
        done = 0
        for id_ in document_ids:
            body = await ops.body("DocumentReference", id_)
            if body is not None:
                await index_document(ops, body)
                done += 1
        return done

    indexed: int = await store._writing(run)
    return indexed


def check_open(repository: FhirRepository) -> Scanning:
    """The repository, when it can be read page by page (every built-in backend can)."""
    if not isinstance(repository, Scanning):
        raise StoreError("this FHIR repository cannot be exported (no paged read)")
    return repository
