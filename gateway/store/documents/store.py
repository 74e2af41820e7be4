"""``BaseDocumentStore``: the DocumentStore operations, written once for every backend; a backend
gives it the document tables (``DocOps``) inside one write or one read of its repository."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypedDict

from gateway.core.errors import BadRequest, Forbidden, NotFound, PasserelleError
from gateway.core.logging import get_logger
from gateway.fhir.resource import ID_RE
from gateway.fhir.search import DEFAULT_COUNT, MAX_COUNT
from gateway.store import fhir_common as common
from gateway.store.documents.access import (
    allowed_patients,
    check_author,
    check_metadata_rights,
    is_unrestricted,
    visible,
    visible_list,
)
from gateway.store.documents.model import Actor, Mode, Retrieved, Version, split_identifier
from gateway.store.documents.ops import (
    DocOps,
    identifier_patients,
    known_blob,
    mask_of,
    one_document,
    patient_of,
)
from gateway.store.documents.patches import apply_json_patch, check_metadata_update
from gateway.store.documents.publication import Publication, new_uuid, with_submission_set
from gateway.store.documents.search import (
    LIST_SEARCH_PARAMS,
    list_matches,
    parse_document_search,
    search_documents,
)
from gateway.store.documents.valuesets import DEFAULT_VALUESETS, ValueSets
from gateway.store.fhir_common import FhirRepository, SearchResult

log = get_logger("passerelle.documents")


class StoreOptions(TypedDict, total=False):
    """The keyword arguments of ``BaseDocumentStore``, which each backend passes on."""

    mode: Mode | str
    valuesets: ValueSets | None


class BaseDocumentStore(ABC):
    """The DocumentStore operations, once for every backend: each runs the shared rules in one
    write (``_writing``: the repository's transaction and the document tables on it) or one read."""

    repository: FhirRepository
    mode: Mode
    valuesets: ValueSets

    def __init__(
        self, repository: FhirRepository, *, mode: Mode | str = Mode.PDSM, valuesets: ValueSets | None = None
    ) -> None:
        self.repository = repository
        self.mode = Mode(mode)
        self.valuesets = valuesets or ValueSets.load(DEFAULT_VALUESETS)
        # The check every written resource passes (the HTTP layer's one validation function): the
        # store runs it on what a metadata update makes, which no caller sees before it is written.
        self.validator: Callable[[Mapping[str, Any]], None] | None = None
        self._ready = False

    async def open(self) -> None:
        """Open the repository, and make the document tables beside it once."""
        await self.repository.open()
        if self._ready:
            return
        await self._create_tables()
        self._ready = True

    @abstractmethod
    async def _create_tables(self) -> None:
        """Create (or migrate) the document tables in the repository's database."""

    @abstractmethod
    async def _writing(self, fn: Callable[[common.Transaction, DocOps], Coroutine[Any, Any, Any]]) -> Any: ...

    @abstractmethod
    async def _reading(self, fn: Callable[[DocOps], Coroutine[Any, Any, Any]]) -> Any: ...

    async def publish(
        self, bundle: Mapping[str, Any], actor: Actor, *, need_submission_set: bool = True
    ) -> dict[str, Any]:
        data = common.copy_json(bundle)
        answer: dict[str, Any] = await self._writing(
            lambda tx, ops: Publication(self, tx, ops, actor).run(
                data, need_submission_set=need_submission_set
            )
        )
        log.info("documents_published", actor=actor.subject, entries=len(answer.get("entry", [])))
        return answer

    async def publish_document(
        self, resource: Mapping[str, Any], actor: Actor
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        doc = common.copy_json(resource)
        if doc.get("resourceType") != "DocumentReference":
            raise BadRequest("ITI-105 takes a DocumentReference", location="resourceType")
        doc.pop("id", None)
        url = f"urn:uuid:{new_uuid()}"
        entry = {"fullUrl": url, "resource": doc, "request": {"method": "POST", "url": "DocumentReference"}}
        bundle = with_submission_set(
            {"resourceType": "Bundle", "type": "transaction", "entry": [entry]},
            f"urn:uuid:{new_uuid()}",
            str(doc.get("date") or ""),
        )
        if not bundle["entry"][0]["resource"]["date"]:
            bundle["entry"][0]["resource"].pop("date")

        async def run(tx: common.Transaction, ops: DocOps) -> tuple[dict[str, Any], list[dict[str, Any]]]:
            answer = await Publication(self, tx, ops, actor).run(bundle)
            result = answer["entry"][1]["response"]
            doc_id = str(result["location"]).split("/")[1]
            current = await tx.fetch("DocumentReference", doc_id)
            assert current is not None and current[2] is not None
            return current[2], list((result.get("outcome") or {}).get("issue", []))

        try:
            stored: tuple[dict[str, Any], list[dict[str, Any]]] = await self._writing(run)
        except PasserelleError as exc:
            # Name the element, not the Bundle the store made around it.
            exc.message = exc.message.replace("Bundle.entry[1].resource", "DocumentReference")
            exc.message = exc.message.replace("Bundle.entry[1]: ", "")
            exc.args = (exc.message,)
            if exc.location:
                exc.location = exc.location.replace("Bundle.entry[1].resource", "DocumentReference")
            raise
        return stored

    async def search(self, params: Sequence[tuple[str, str]], actor: Actor) -> SearchResult:
        query = parse_document_search(params)  # a BadRequest leaves before any I/O
        result: SearchResult = await self._reading(lambda ops: search_documents(ops, query, actor))
        return result

    async def search_lists(self, params: Sequence[tuple[str, str]], actor: Actor) -> SearchResult:
        """ITI-66: SubmissionSets and Folders of a patient, by code, status, identifier, date."""
        wanted: dict[str, list[str]] = {}
        count, offset = DEFAULT_COUNT, 0
        for name, value in params:
            if name in ("_format", "_pretty") or value == "":
                continue
            if name in ("_count", "_offset"):
                if not value.isascii() or not value.isdigit() or len(value) > 9:
                    raise BadRequest(f"{name} must be a non-negative integer", location=name)
                count, offset = (
                    (min(int(value), MAX_COUNT), offset) if name == "_count" else (count, int(value))
                )
            elif name in LIST_SEARCH_PARAMS:
                wanted.setdefault(name, []).extend(v for v in value.split(",") if v)
            else:
                raise BadRequest(f"unsupported search parameter {name!r} for List", location=name)
        if "patient" not in wanted and "patient.identifier" not in wanted:
            raise BadRequest("ITI-66 needs patient or patient.identifier", location="patient")

        async def run(ops: DocOps) -> SearchResult:
            patients = {v if v.startswith("Patient/") else f"Patient/{v}" for v in wanted.get("patient", [])}
            patients |= await identifier_patients(
                ops, [split_identifier(v) for v in wanted.get("patient.identifier", [])]
            )
            allowed = await allowed_patients(ops, actor)
            if allowed is not None and not patients <= allowed:
                raise Forbidden("a patient sees their own documents only", location="patient")
            lists = []
            for patient in sorted(patients):
                for item in await ops.patient_lists(patient):
                    if list_matches(item, wanted) and (shown := await visible_list(ops, actor, item)):
                        lists.append(shown)
            lists.sort(key=lambda r: (str(r.get("date", "")), r["id"]), reverse=True)
            return SearchResult(lists[offset : offset + count], len(lists), [], count, offset)

        result: SearchResult = await self._reading(run)
        return result

    async def allowed_patients(self, actor: Actor) -> set[str] | None:
        """The "Patient/id" records this actor may see; None when it is not limited to some."""
        if actor.patients is None:
            return None
        result: set[str] | None = await self._reading(lambda ops: allowed_patients(ops, actor))
        return result

    async def read_list(self, id_: str, actor: Actor) -> dict[str, Any] | None:
        """A List (SubmissionSet, Folder...), when it is about a patient this actor may see."""

        async def run(ops: DocOps) -> dict[str, Any] | None:
            found = await ops.body("List", id_)
            if found is None:
                return None
            allowed = await allowed_patients(ops, actor)
            if allowed is not None and (found.get("subject") or {}).get("reference") not in allowed:
                return None
            return await visible_list(ops, actor, found)

        result: dict[str, Any] | None = await self._reading(run)
        return result

    async def visible_lists(
        self, lists: Sequence[dict[str, Any]], actor: Actor
    ) -> list[dict[str, Any] | None]:
        """Each List as this actor may see it (``visible_list``), None for those it may not see."""
        if is_unrestricted(actor) or not lists:
            return list(lists)

        async def run(ops: DocOps) -> list[dict[str, Any] | None]:
            return [await visible_list(ops, actor, item) for item in lists]

        result: list[dict[str, Any] | None] = await self._reading(run)
        return result

    async def versions(self, type_: str, id_: str) -> list[Version]:
        """Every version of any resource of the repository, newest first (vread, history): the
        repository keeps them, and this store reaches its tables on both backends. A resource
        loaded without history (``bulk_load``) has its current version only."""

        async def run(ops: DocOps) -> list[Version]:
            found = await ops.versions(type_, id_)
            current = await ops.rows(
                "SELECT version_id, last_updated, deleted FROM resources WHERE type=? AND id=?", (type_, id_)
            )
            if current and not int(current[0][2]) and all(v.version != int(current[0][0]) for v in found):
                body = await ops.body(type_, id_)
                found.insert(0, Version(int(current[0][0]), str(current[0][1]), body))
            return found

        result: list[Version] = await self._reading(run)
        return result

    async def read(self, id_: str, actor: Actor) -> dict[str, Any] | None:
        async def run(ops: DocOps) -> dict[str, Any] | None:
            found = await ops.indexed_document(id_)
            if found is None:
                return None
            body, patient, mask = found
            if patient is None:  # not published through the store: only unrestricted callers
                return body if actor.patients is None and not actor.hidden else None
            return body if await visible(ops, actor, patient, int(mask or 0), id_) else None

        result: dict[str, Any] | None = await self._reading(run)
        return result

    async def retrieve(self, binary_id: str, actor: Actor) -> Retrieved | None:
        async def run(ops: DocOps) -> Retrieved | None:
            blob = await known_blob(ops, binary_id)
            if blob is None:
                return None
            owners = await ops.rows(
                "SELECT d.patient, d.mask, d.id FROM doc_tokens t JOIN doc_index d ON d.id=t.id"
                " WHERE t.param='binary' AND t.value=?",
                (binary_id,),
            )
            if owners:
                for p, m, d in owners:
                    if await visible(ops, actor, p, m, d):
                        break
                else:
                    return None
            elif actor.patients is not None or actor.hidden:
                return None
            return Retrieved(blob.data, blob.content_type or "application/octet-stream")

        result: Retrieved | None = await self._reading(run)
        return result

    async def patch(self, target: str, operations: Any, actor: Actor) -> dict[str, Any]:
        async def run(tx: common.Transaction, ops: DocOps) -> dict[str, Any]:
            pub = Publication(self, tx, ops, actor)
            doc_id = await _target(ops, target)
            # Found by identifier, a document the actor may not see is named by no answer.
            absent = NotFound(
                f"DocumentReference/{doc_id} is not known"
                if not target.startswith("?")
                else "no DocumentReference has this identifier"
            )
            current = await tx.fetch("DocumentReference", doc_id)
            if current is None or current[2] is None:
                raise absent
            before = current[2]
            if not await visible(ops, actor, patient_of(before), mask_of(before), doc_id):
                raise absent
            after = apply_json_patch(before, operations)
            check_metadata_update(before, after)
            await check_metadata_rights(ops, actor, doc_id, before, after)
            return await pub.update(before, after, validate=True)

        stored: dict[str, Any] = await self._writing(run)
        log.info("document_updated", actor=actor.subject, document=stored["id"])
        return stored

    async def delete(self, id_: str, actor: Actor) -> dict[str, Any]:
        async def run(tx: common.Transaction, ops: DocOps) -> dict[str, Any]:
            current = await tx.fetch("DocumentReference", id_) if ID_RE.fullmatch(id_) else None
            if current is None or current[2] is None:
                raise NotFound(f"DocumentReference/{id_} is not known")
            before = current[2]
            if not await visible(ops, actor, patient_of(before), mask_of(before), id_):
                raise NotFound(f"DocumentReference/{id_} is not known")
            await check_author(ops, actor, id_)
            pub = Publication(self, tx, ops, actor)
            return await pub.update(before, {**before, "status": "entered-in-error"})

        stored: dict[str, Any] = await self._writing(run)
        log.info("document_deleted", actor=actor.subject, document=stored["id"])
        return stored


async def _target(ops: DocOps, target: str) -> str:
    """The document a metadata update names: its id, or ``?identifier=…`` criteria."""
    if not target.startswith("?"):
        if not ID_RE.fullmatch(target):
            raise NotFound("no such DocumentReference")
        return target
    return await one_document(ops, target[1:], "identifier")
