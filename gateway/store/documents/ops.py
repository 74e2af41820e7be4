"""The document tables of one connection (``DocOps``: what differs between the backends) and what
the store does through them on either backend: write a document's index rows, find a blob, the
patients an identifier names, the document ``identifier=…`` criteria select."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from gateway.core.errors import BadRequest, Conflict, NotFound
from gateway.fhir.search import date_range
from gateway.store.documents.blobs import BINARY_URL, Blob
from gateway.store.documents.model import IS_ARCHIVED, MASK_BITS, VISIBILITY, Version, split_identifier
from gateway.store.documents.valuesets import codings


class DocOps(ABC):
    """The document tables of one open connection (inside a write or for a read): what differs
    between the backends. ``rows`` takes SQL both databases accept, with ``?`` placeholders."""

    @abstractmethod
    async def rows(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]: ...

    @abstractmethod
    async def body(self, type_: str, id_: str) -> dict[str, Any] | None:
        """A live resource's current body."""

    @abstractmethod
    async def store_blob(self, blob: Blob) -> None:
        """Keep the bytes once (by SHA-256) and say which bytes the Binary stands for."""

    @abstractmethod
    async def write_index(
        self, id_: str, values: tuple[Any, ...], tokens: list[tuple[str, str, str]]
    ) -> None:
        """Replace a document's ``doc_index`` row (``INDEX_COLUMNS``) and its ``doc_tokens``."""

    @abstractmethod
    async def documents(
        self, where: str, args: Sequence[Any], count: int, offset: int
    ) -> tuple[int, list[dict[str, Any]]]:
        """(total, one page of bodies) of the documents ``where`` (over ``doc_index d``) selects,
        newest ``date`` first (no date last), then by id."""

    @abstractmethod
    async def patient_lists(self, patient: str) -> list[dict[str, Any]]:
        """The live Lists whose subject is ``patient`` ("Patient/id")."""

    @abstractmethod
    async def indexed_document(self, id_: str) -> tuple[dict[str, Any], str | None, int | None] | None:
        """A live DocumentReference with its indexed patient and mask (None, None: not indexed)."""

    @abstractmethod
    async def versions(self, type_: str, id_: str) -> list[Version]:
        """Every version the repository keeps of a resource (``resource_versions``), newest first."""


INDEX_COLUMNS = (
    "id",
    "patient",
    "status",
    "date",
    "creation",
    "period_start",
    "period_end",
    "archived",
    "mask",
)


# -- lookups -----------------------------------------------------------------------------------------


async def known_blob(ops: DocOps, binary_id: str) -> Blob | None:
    """The bytes a stored Binary stands for, or None."""
    rows = await ops.rows(
        "SELECT b.content_type, d.data FROM doc_binaries b JOIN doc_blobs d ON d.sha256=b.sha256"
        " WHERE b.id=?",
        (binary_id,),
    )
    if not rows:
        return None
    row = rows[0]
    blob = Blob(bytes(row[1]), str(row[0]))
    blob.binary_id = binary_id
    return blob


async def identifier_patients(ops: DocOps, idents: Iterable[tuple[str | None, str]]) -> set[str]:
    """ "Patient/id" of the live Patients carrying any of these identifiers (INS, IPP...)."""
    found: set[str] = set()
    for system, value in idents:
        if system:
            rows = await ops.rows(
                "SELECT s.id FROM search_index s JOIN resources r ON r.type=s.type AND r.id=s.id"
                " WHERE s.type='Patient' AND s.param='identifier' AND s.system=? AND s.value=?"
                " AND r.deleted=0",
                (system, value),
            )
        else:
            rows = await ops.rows(
                "SELECT s.id FROM search_index s JOIN resources r ON r.type=s.type AND r.id=s.id"
                " WHERE s.type='Patient' AND s.param='identifier' AND s.value=? AND r.deleted=0",
                (value,),
            )
        found.update(f"Patient/{row[0]}" for row in rows)
    return found


async def one_document(ops: DocOps, query: str, where: str) -> str:
    """The one document ``identifier=…`` criteria select (masterIdentifier or identifier)."""
    params = parse_qsl(query, keep_blank_values=True)
    if not params or any(k != "identifier" or not v for k, v in params):
        raise BadRequest("a document is selected by identifier=system|value", location=where)
    ids: set[str] | None = None
    for _, value in params:
        system, code = split_identifier(value)
        sql = "SELECT id FROM doc_tokens WHERE param='identifier' AND value=?"
        args = [code]
        if system:
            sql += " AND system=?"
            args.append(system)
        found = {str(r[0]) for r in await ops.rows(sql, args)}
        ids = found if ids is None else ids & found
    if not ids:
        raise NotFound("no DocumentReference has this identifier", location=where)
    if len(ids) > 1:
        raise Conflict("the identifier matches several documents (precondition failed)", location=where)
    return ids.pop()


# -- the index ---------------------------------------------------------------------------------------


def _instant(text: Any) -> str | None:
    if not isinstance(text, str):
        return None
    try:
        return date_range(text, "date")[0]
    except BadRequest:
        return None


def _period_end(text: Any) -> str | None:
    if not isinstance(text, str):
        return None
    try:
        low, high = date_range(text, "date")
    except BadRequest:
        return None
    return high or low


def is_archived(doc: Mapping[str, Any]) -> bool:
    """Whether the document carries the PDSm isArchived extension, true."""
    for ext in doc.get("extension") or ():
        if isinstance(ext, dict) and ext.get("url") == IS_ARCHIVED:
            return ext.get("valueBoolean") is True
    return False


def mask_of(doc: Mapping[str, Any]) -> int:
    """The ``MASK_BITS`` of the document's TRE_A07 visibility labels."""
    bits = 0
    for label in doc.get("securityLabel") or ():
        for coding in codings(label):
            if coding.get("system") == VISIBILITY:
                bits |= MASK_BITS.get(str(coding.get("code")), 0)
    return bits


async def _author_identifiers(ops: DocOps, doc: Mapping[str, Any]) -> list[tuple[str, str]]:
    contained = {
        f"#{c.get('id')}": c for c in doc.get("contained") or () if isinstance(c, dict) and c.get("id")
    }
    found: list[tuple[str, str]] = []
    for author in doc.get("author") or ():
        if not isinstance(author, dict):
            continue
        idents = [author["identifier"]] if isinstance(author.get("identifier"), dict) else []
        ref = author.get("reference")
        if isinstance(ref, str):
            target: Any = contained.get(ref)
            if target is None and "/" in ref and not ref.startswith("#"):
                type_, _, id_ = ref.rpartition("/")
                target = await ops.body(type_.rsplit("/", 1)[-1], id_)
            if isinstance(target, dict):
                idents += [i for i in target.get("identifier") or () if isinstance(i, dict)]
        for ident in idents:
            if isinstance(ident.get("value"), str):
                system = ident.get("system")
                found.append((system if isinstance(system, str) else "", ident["value"]))
    return found


async def _tokens(ops: DocOps, doc: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    rows: set[tuple[str, str, str]] = set()

    def codes(param: str, concept: Any) -> None:
        for coding in codings(concept):
            if isinstance(coding.get("code"), str):
                system = coding.get("system")
                rows.add((param, system if isinstance(system, str) else "", coding["code"]))

    for ident in [doc.get("masterIdentifier"), *(doc.get("identifier") or ())]:
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            system = ident.get("system")
            rows.add(("identifier", system if isinstance(system, str) else "", ident["value"]))
    codes("type", doc.get("type"))
    for cat in doc.get("category") or ():
        codes("category", cat)
    for label in doc.get("securityLabel") or ():
        codes("security-label", label)
    context: dict[str, Any] = doc["context"] if isinstance(doc.get("context"), dict) else {}
    for event in context.get("event") or ():
        codes("event", event)
    codes("facility", context.get("facilityType"))
    codes("setting", context.get("practiceSetting"))
    for content in doc.get("content") or ():
        if not isinstance(content, dict):
            continue
        fmt = content.get("format")
        if isinstance(fmt, dict):
            codes("format", {"coding": [fmt]})
        url = (content.get("attachment") or {}).get("url")
        match = BINARY_URL.search(url) if isinstance(url, str) else None
        if match:
            rows.add(("binary", "", match[1]))
    for rel in doc.get("relatesTo") or ():
        ref = ((rel or {}).get("target") or {}).get("reference")
        if isinstance(ref, str) and "/" in ref:
            rows.add(("relatesto", "", "/".join(ref.split("/")[-2:])))
    for author in doc.get("author") or ():
        ref = (author or {}).get("reference")
        if isinstance(ref, str) and "/" in ref and not ref.startswith("#"):
            rows.add(("author", "", "/".join(ref.split("/")[-2:])))
    for system, value in await _author_identifiers(ops, doc):
        rows.add(("author.identifier", system, value))
    return rows


def patient_of(doc: Mapping[str, Any]) -> str:
    """The document's subject as "Patient/id" ("" when it names no Patient)."""
    ref = ((doc.get("subject") or {}) if isinstance(doc.get("subject"), dict) else {}).get("reference")
    if isinstance(ref, str) and ref.startswith("Patient/"):
        return ref
    if isinstance(ref, str) and "/Patient/" in ref:
        return "Patient/" + ref.rsplit("/", 1)[-1]
    return ""


async def index_document(ops: DocOps, doc: Mapping[str, Any]) -> None:
    """(Re)write the index rows of one DocumentReference version."""
    id_ = doc["id"]
    context: dict[str, Any] = doc["context"] if isinstance(doc.get("context"), dict) else {}
    period: dict[str, Any] = context["period"] if isinstance(context.get("period"), dict) else {}
    creation = None
    for content in doc.get("content") or ():
        creation = _instant(((content or {}).get("attachment") or {}).get("creation"))
        if creation:
            break
    await ops.write_index(
        id_,
        (
            id_,
            patient_of(doc),
            str(doc.get("status", "")),
            _instant(doc.get("date")),
            creation,
            _instant(period.get("start")),
            _period_end(period.get("end")),
            int(is_archived(doc)),
            mask_of(doc),
        ),
        sorted(await _tokens(ops, doc)),
    )
