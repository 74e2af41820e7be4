"""The DMP-style document store (PDSm 3.1.1 / IHE MHD) on top of the built-in FHIR repository.

DocumentReference, List and Binary stay ordinary resources of the repository (readable through
/fhir); this module adds, in the same SQLite file and the same write transactions:

- ``doc_blobs``: each document's bytes once, keyed by SHA-256 (content-addressed); the Binary
  resources keep their metadata only, and ``doc_binaries`` says which bytes each one stands for;
- ``doc_index`` and ``doc_tokens``: the ITI-67 search parameters in real columns, so that
  patient + status (+ type...) stays an index lookup at millions of documents;
- the DMP rules: replacement (``relatesTo`` replaces → the old one is superseded in the same
  transaction), the archive flag, visibility codes per audience, author-only logical delete,
  size and SHA-1 hash checked against the bytes, the patient found by INS or IPP, metadata
  checked against the value sets in ``profiles/valuesets`` (warnings in ``pdsm`` mode, 422 in
  ``dmp`` mode).

Everything one request does runs in one write of the repository (one SAVEPOINT inside its group
commit on SQLite, one transaction on PostgreSQL): any failure leaves nothing behind.

The rules are written once, as coroutines over ``DocOps`` (the document tables of one connection)
and the repository's ``fhir_common.Transaction``; ``SqliteDocumentStore`` runs them synchronously
on the repository's threads, ``gateway.store.pg_documents`` awaits them on PostgreSQL.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl

import orjson

from gateway.core.errors import (
    BadRequest,
    ConfigError,
    Conflict,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PasserelleError,
    Unprocessable,
)
from gateway.core.logging import get_logger
from gateway.core.outcome import outcome
from gateway.store import fhir_common as common
from gateway.store.doc_search import DocumentQuery, parse_document_search
from gateway.store.fhir import (
    DEFAULT_COUNT,
    ID_RE,
    MAX_COUNT,
    FhirRepository,
    SearchResult,
    SqliteFhirRepository,
    _copy,
    _date_range,
    _Writer,
)

log = get_logger("passerelle.documents")

# PDSm / MHD / NOS facts (see the project's French interoperability notes).
IS_ARCHIVED = "https://interop.esante.gouv.fr/ig/fhir/pdsm/StructureDefinition/pdsm-ext-is-archived"
VISIBILITY = (
    "https://mos.esante.gouv.fr/NOS/TRE_A07-StatutVisibiliteDocument/FHIR/TRE-A07-StatutVisibiliteDocument"
)
MHD_LIST_TYPES = "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes"
URI_SYSTEM = "urn:ietf:rfc:3986"

# One bit per TRE_A07 visibility code; an Actor hides the bits of its audience.
MASQUE_PS = 1  # hidden from health professionals
INVISIBLE_PATIENT = 2
INVISIBLE_REPRESENTANTS_LEGAUX = 4
MASQUE_PSOCIAL = 8  # hidden from social-sector professionals
MASQUE_PT = 16  # hidden from third parties
MASK_BITS = {
    "MASQUE_PS": MASQUE_PS,
    "INVISIBLE_PATIENT": INVISIBLE_PATIENT,
    "INVISIBLE_REPRESENTANTS_LEGAUX": INVISIBLE_REPRESENTANTS_LEGAUX,
    "MASQUE_PSOCIAL": MASQUE_PSOCIAL,
    "MASQUE_PT": MASQUE_PT,
}
STATUSES = ("current", "superseded", "entered-in-error")
# ITI-66 search parameters (name → FHIR type); the CapabilityStatement is made from it.
LIST_SEARCH_PARAMS: dict[str, str] = {
    "patient": "reference",
    "patient.identifier": "token",
    "code": "token",
    "status": "token",
    "identifier": "token",
    "source.identifier": "token",
}
DEFAULT_VALUESETS = Path(__file__).resolve().parents[2] / "profiles" / "valuesets"

# The element each value set checks: (path in the resource, ValueSet id).
J07, J06, J10 = "JDV-J07-XdsTypeCode-CISIS", "JDV-J06-XdsClassCode-CISIS", "JDV-J10-XdsFormatCode-CISIS"
J02 = "JDV-J02-XdsHealthcareFacilityTypeCode-CISIS"
J04, J08 = "JDV-J04-XdsPracticeSettingCode-CISIS", "JDV-J08-XdsConfidentialityCode-CISIS"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS doc_blobs (sha256 TEXT PRIMARY KEY, sha1 BLOB NOT NULL,"
    " size INTEGER NOT NULL, data BLOB NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS doc_binaries (id TEXT PRIMARY KEY, sha256 TEXT NOT NULL,"
    " content_type TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS doc_index (id TEXT PRIMARY KEY, patient TEXT NOT NULL,"
    " status TEXT NOT NULL, date TEXT, creation TEXT, period_start TEXT, period_end TEXT,"
    " archived INTEGER NOT NULL DEFAULT 0, mask INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS doc_index_patient ON doc_index(patient, status, date)",
    "CREATE TABLE IF NOT EXISTS doc_tokens (id TEXT NOT NULL, param TEXT NOT NULL,"
    " system TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (id, param, system, value)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS doc_tokens_value ON doc_tokens(param, value)",
)


class Mode(StrEnum):
    PDSM = "pdsm"  # value sets preferred: unknown codes are warnings
    DMP = "dmp"  # DMP value sets enforced: unknown codes are 422


@dataclass(frozen=True, slots=True)
class Actor:
    """Who a store call acts for, in the store's own terms (the HTTP layer maps its Caller)."""

    hidden: int = 0  # MASK_BITS this actor must never see
    patients: tuple[str, ...] | None = None  # "system|value" identifiers it may see; None = all
    practitioner: str | None = None  # its practitioner identifier ("system|value" or value)
    may_delete_any: bool = False  # the gateway's own feed, administrators
    subject: str = "feed"  # an opaque id for logs, never a name


FEED = Actor(may_delete_any=True, subject="feed")


@dataclass(frozen=True, slots=True)
class Version:
    """One version of a resource, as the repository keeps it (``body`` None: a deletion)."""

    version: int
    last_updated: str
    body: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Retrieved:
    """ITI-68: a document's bytes and their content type."""

    data: bytes
    content_type: str


class DocumentStore(Protocol):
    """Where documents are published, found and read, with the DMP's rules (PDSm transactions)."""

    async def open(self) -> None: ...

    async def publish(self, bundle: Mapping[str, Any], actor: Actor) -> dict[str, Any]:
        """ITI-65: a transaction Bundle → its transaction-response, all or nothing."""
        ...

    async def publish_document(
        self, resource: Mapping[str, Any], actor: Actor
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """ITI-105: one DocumentReference with ``attachment.data`` → (stored, warnings)."""
        ...

    async def search(self, params: Sequence[tuple[str, str]], actor: Actor) -> SearchResult: ...

    async def search_lists(self, params: Sequence[tuple[str, str]], actor: Actor) -> SearchResult: ...

    async def read(self, id_: str, actor: Actor) -> dict[str, Any] | None: ...

    async def retrieve(self, binary_id: str, actor: Actor) -> Retrieved | None: ...

    async def patch(self, target: str, operations: Any, actor: Actor) -> dict[str, Any]:
        """Metadata update: ``target`` is an id or ``?criteria``; JSON Patch operations."""
        ...

    async def delete(self, id_: str, actor: Actor) -> dict[str, Any]:
        """Logical delete (status entered-in-error), by the document's author only."""
        ...


# -- value sets ------------------------------------------------------------------------------------


class ValueSets:
    """The codes of the ValueSet JSON files the gateway ships (``compose.include`` with concepts)."""

    def __init__(self, sets: Mapping[str, frozenset[tuple[str, str]]]) -> None:
        self.sets = dict(sets)

    @classmethod
    def load(cls, directory: Path) -> ValueSets:
        sets: dict[str, frozenset[tuple[str, str]]] = {}
        for path in sorted(directory.glob("ValueSet-*.json")):
            try:
                data = orjson.loads(path.read_bytes())
                codes = frozenset(
                    (str(inc["system"]), str(concept["code"]))
                    for inc in data["compose"]["include"]
                    for concept in inc.get("concept", ())
                )
                sets[str(data["id"])] = codes
            except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(f"not a readable ValueSet: {exc}", file=str(path)) from exc
        missing = [v for v in (J07, J06, J10, J02, J04, J08) if v not in sets]
        if missing:
            raise ConfigError(f"value sets missing: {', '.join(missing)}", file=str(directory))
        return cls(sets)

    def contains(self, valueset: str, system: str, code: str) -> bool:
        return (system, code) in self.sets.get(valueset, frozenset())


def _codings(concept: Any) -> list[dict[str, Any]]:
    if not isinstance(concept, dict):
        return []
    return [c for c in concept.get("coding") or () if isinstance(c, dict)]


def _coded_elements(doc: Mapping[str, Any]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(path, value set, codings) of every element PDSm binds to a DMP value set."""
    out = [("type", J07, _codings(doc.get("type")))]
    for i, cat in enumerate(doc.get("category") or ()):
        out.append((f"category[{i}]", J06, _codings(cat)))
    for i, label in enumerate(doc.get("securityLabel") or ()):
        out.append((f"securityLabel[{i}]", J08, _codings(label)))
    for i, content in enumerate(doc.get("content") or ()):
        fmt = content.get("format") if isinstance(content, dict) else None
        if isinstance(fmt, dict):
            out.append((f"content[{i}].format", J10, [fmt]))
    context = doc.get("context") or {}
    if isinstance(context, dict):
        if context.get("facilityType") is not None:
            out.append(("context.facilityType", J02, _codings(context["facilityType"])))
        if context.get("practiceSetting") is not None:
            out.append(("context.practiceSetting", J04, _codings(context["practiceSetting"])))
    return out


def _issue(severity: str, code: str, text: str, where: str) -> dict[str, Any]:
    return {"severity": severity, "code": code, "diagnostics": text, "expression": [where]}


# -- bytes ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Blob:
    data: bytes
    content_type: str | None
    binary_id: str = ""
    sha256: str = field(init=False)
    sha1: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.sha1 = hashlib.sha1(self.data, usedforsecurity=False).digest()


def _b64(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise BadRequest(f"{where} must be base64 text", location=where)
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise BadRequest(f"{where} is not valid base64", location=where) from exc


async def _known_blob(ops: DocOps, binary_id: str) -> _Blob | None:
    rows = await ops.rows(
        "SELECT b.content_type, d.data FROM doc_binaries b JOIN doc_blobs d ON d.sha256=b.sha256"
        " WHERE b.id=?",
        (binary_id,),
    )
    if not rows:
        return None
    row = rows[0]
    blob = _Blob(bytes(row[1]), str(row[0]))
    blob.binary_id = binary_id
    return blob


_BINARY_URL = re.compile(r"(?:^|/)Binary/([A-Za-z0-9\-.]{1,64})$")


class DocOps(ABC):
    """The document tables of one open connection (inside a write or for a read): what differs
    between the backends. ``rows`` takes SQL both databases accept, with ``?`` placeholders."""

    @abstractmethod
    async def rows(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]: ...

    @abstractmethod
    async def body(self, type_: str, id_: str) -> dict[str, Any] | None:
        """A live resource's current body."""

    @abstractmethod
    async def store_blob(self, blob: _Blob) -> None:
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


# -- the index ---------------------------------------------------------------------------------------


def _instant(text: Any) -> str | None:
    if not isinstance(text, str):
        return None
    try:
        return _date_range(text, "date")[0]
    except BadRequest:
        return None


def _period_end(text: Any) -> str | None:
    if not isinstance(text, str):
        return None
    try:
        low, high = _date_range(text, "date")
    except BadRequest:
        return None
    return high or low


def is_archived(doc: Mapping[str, Any]) -> bool:
    for ext in doc.get("extension") or ():
        if isinstance(ext, dict) and ext.get("url") == IS_ARCHIVED:
            return ext.get("valueBoolean") is True
    return False


def mask_of(doc: Mapping[str, Any]) -> int:
    bits = 0
    for label in doc.get("securityLabel") or ():
        for coding in _codings(label):
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
        for coding in _codings(concept):
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
        match = _BINARY_URL.search(url) if isinstance(url, str) else None
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


def _patient_of(doc: Mapping[str, Any]) -> str:
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
            _patient_of(doc),
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


# -- who may see what --------------------------------------------------------------------------


async def _identifier_patients(ops: DocOps, idents: Iterable[tuple[str | None, str]]) -> set[str]:
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


def _split_identifier(text: str) -> tuple[str | None, str]:
    system, sep, value = text.rpartition("|")
    return (system or None, value) if sep else (None, text)


async def _allowed_patients(ops: DocOps, actor: Actor) -> set[str] | None:
    if actor.patients is None:
        return None
    return await _identifier_patients(ops, [_split_identifier(p) for p in actor.patients])


def _authored(actor: Actor) -> tuple[str, list[Any]] | None:
    """SQL selecting the ids of the documents this actor's practitioner authored, or None."""
    if not actor.practitioner:
        return None
    system, value = _split_identifier(actor.practitioner)
    # A practitioner id may come as "8|<RPPS>": the IDNPS value is then "8<RPPS>".
    values = sorted({value} | ({system + value} if system and ":" not in system else set()))
    marks = ",".join("?" * len(values))
    sql = f"SELECT id FROM doc_tokens WHERE param='author.identifier' AND value IN ({marks})"  # noqa: S608
    args: list[Any] = list(values)
    if system and ":" in system:
        sql += " AND system=?"
        args.append(system)
    return sql, args


async def _is_author(ops: DocOps, actor: Actor, doc_id: str) -> bool:
    authored = _authored(actor)
    if authored is None:
        return False
    sql, args = authored
    return bool(await ops.rows(f"{sql} AND id=?", [*args, doc_id]))


async def _visible(ops: DocOps, actor: Actor, patient: str, mask: int, doc_id: str) -> bool:
    # A document masked from professionals stays visible to its author, who may unmask it.
    if mask & actor.hidden and not await _is_author(ops, actor, doc_id):
        return False
    allowed = await _allowed_patients(ops, actor)
    return allowed is None or patient in allowed


def is_unrestricted(actor: Actor) -> bool:
    """An actor no visibility rule limits (operators, administrators, the feed)."""
    return actor.patients is None and not actor.hidden


# "DocumentReference/id" at the end of a reference (relative, absolute, or versioned).
_DOCUMENT_REFERENCE = re.compile(r"(?:^|/)DocumentReference/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]*)?$")


def _listed_document(entry: Any) -> str | None:
    item = entry.get("item") if isinstance(entry, dict) else None
    ref = item.get("reference") if isinstance(item, dict) else None
    match = _DOCUMENT_REFERENCE.search(ref) if isinstance(ref, str) else None
    return match[1] if match else None


async def _visible_documents(ops: DocOps, actor: Actor, ids: set[str]) -> set[str]:
    """Which of these DocumentReference ids the actor may see; an id that names no live document
    counts as seen (there is nothing to hide about it)."""
    if is_unrestricted(actor) or not ids:
        return set(ids)
    marks = ",".join("?" * len(ids))
    rows = await ops.rows(
        "SELECT r.id, d.patient, d.mask FROM resources r LEFT JOIN doc_index d ON d.id=r.id"  # noqa: S608
        f" WHERE r.type='DocumentReference' AND r.deleted=0 AND r.id IN ({marks})",
        sorted(ids),
    )
    seen = set(ids) - {str(row[0]) for row in rows}
    authored: set[str] = set()
    if (mine := _authored(actor)) is not None:
        sql, args = mine
        authored = {str(r[0]) for r in await ops.rows(f"{sql} AND id IN ({marks})", [*args, *sorted(ids)])}
    allowed = await _allowed_patients(ops, actor)
    for id_, patient, mask in rows:
        if patient is None:
            continue  # not published through the store: shown to unrestricted callers only
        if int(mask or 0) & actor.hidden and str(id_) not in authored:
            continue
        if allowed is None or patient in allowed:
            seen.add(str(id_))
    return seen


async def visible_list(ops: DocOps, actor: Actor, item: dict[str, Any]) -> dict[str, Any] | None:
    """A List as this actor may see it: without the entries of documents hidden from it, and
    None when every document it names is hidden (the List would reveal them only)."""
    entries = item.get("entry")
    if is_unrestricted(actor) or not isinstance(entries, list):
        return item
    listed = {i: doc for i, e in enumerate(entries) if (doc := _listed_document(e)) is not None}
    if not listed:
        return item
    seen = await _visible_documents(ops, actor, set(listed.values()))
    hidden = {i for i, doc in listed.items() if doc not in seen}
    if not hidden:
        return item
    if len(hidden) == len(listed):
        return None
    return {**item, "entry": [e for i, e in enumerate(entries) if i not in hidden]}


async def _check_author(ops: DocOps, actor: Actor, doc_id: str) -> None:
    """Only the document's author may delete it (DMP rule); 403 for anyone else."""
    if actor.may_delete_any or await _is_author(ops, actor, doc_id):
        return
    raise Forbidden("only the document's author may delete it", location="DocumentReference.author")


# -- who may change what of a published document -------------------------------------------------
#
# A published document's status, visibility (every securityLabel: the TRE_A07 codes and the
# confidentiality) and archive flag are its author's (DMP: the author deletes, replaces, makes a
# document visible to the patient after the announcement consultation...). Administrators and the
# gateway's own feed (``may_delete_any``) may change them too. The patient may mask a document
# of their own record from an audience of professionals, and unmask it: the codes below, and
# nothing else. Anyone else changes none of them (403).

PATIENT_LABELS = frozenset({"MASQUE_PS", "MASQUE_PSOCIAL", "MASQUE_PT"})


def _label_set(doc: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    out: set[tuple[str, str, str]] = set()
    for label in doc.get("securityLabel") or ():
        codings = _codings(label)
        if not codings:
            out.add(("", "", orjson.dumps(label).decode()))  # not a coded label: compared whole
        for coding in codings:
            out.add(
                (str(coding.get("system", "")), str(coding.get("code", "")), str(coding.get("display", "")))
            )
    return out


def metadata_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[list[str], set[str]]:
    """(the elements a metadata update changes: status, isArchived; the securityLabel codes it adds
    or removes, as "system|code")."""
    changed = [name for name in ("status",) if before.get(name) != after.get(name)]
    if is_archived(before) != is_archived(after):
        changed.append("isArchived")
    labels = {f"{system}|{code}" for system, code, _ in _label_set(before) ^ _label_set(after)}
    return changed, labels


async def check_metadata_rights(
    ops: DocOps, actor: Actor, doc_id: str, before: Mapping[str, Any], after: Mapping[str, Any]
) -> None:
    """403 unless this actor may make this change to this (visible) document: see above."""
    changed, labels = metadata_changes(before, after)
    if (not changed and not labels) or actor.may_delete_any:
        return
    if actor.patients is not None:  # the patient, on their own record (visibility checked before)
        patient_may = {f"{VISIBILITY}|{code}" for code in PATIENT_LABELS}
        if changed or not labels <= patient_may:
            raise Forbidden(
                "a patient may only mask or unmask a document from professionals"
                f" ({', '.join(sorted(PATIENT_LABELS))}); its author changes the rest",
                location=f"DocumentReference.{changed[0] if changed else 'securityLabel'}",
            )
        return
    if await _is_author(ops, actor, doc_id):
        return
    if "status" in changed:
        what, where = "status", "status"
    elif labels:
        what, where = "visibility (securityLabel)", "securityLabel"
    else:
        what, where = "archive flag", "extension"
    raise Forbidden(
        f"only the document's author may change its {what}", location=f"DocumentReference.{where}"
    )


# -- patches ----------------------------------------------------------------------------------------


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise BadRequest(f"JSON Pointer {path!r} must start with /", location="path")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str], op: str) -> tuple[Any, str]:
    node = doc
    for part in parts[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise Unprocessable(f"{op}: path does not exist", location="/" + "/".join(parts))
    if not parts:
        raise MethodNotAllowed("a patch may not replace the whole resource")
    return node, parts[-1]


def _get(doc: Any, parts: list[str]) -> Any:
    node, last = _parent(doc, parts, "read")
    if isinstance(node, dict) and last in node:
        return node[last]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        return node[int(last)]
    raise Unprocessable("path does not exist", location="/" + "/".join(parts))


def apply_json_patch(doc: dict[str, Any], operations: Any) -> dict[str, Any]:
    """RFC 6902 (add, remove, replace, move, copy, test) on a copy of ``doc``."""
    if not isinstance(operations, list):
        raise BadRequest("a JSON Patch is a list of operations")
    out: dict[str, Any] = orjson.loads(orjson.dumps(doc))
    for op in operations:
        if (
            not isinstance(op, dict)
            or not isinstance(op.get("op"), str)
            or not isinstance(op.get("path"), str)
        ):
            raise BadRequest("each JSON Patch operation needs op and path")
        kind, parts = op["op"], _pointer(op["path"])
        if kind in ("add", "replace", "test") and "value" not in op:
            raise BadRequest(f"{kind} needs a value", location=op["path"])
        if kind == "test":
            if _get(out, parts) != op["value"]:
                raise Conflict("JSON Patch test failed", location=op["path"])
            continue
        if kind in ("move", "copy"):
            source = _pointer(str(op.get("from", "")))
            value = orjson.loads(orjson.dumps(_get(out, source)))
            if kind == "move":
                _remove(out, source)
            _add(out, parts, value)
        elif kind == "add":
            _add(out, parts, op["value"])
        elif kind == "remove":
            _remove(out, parts)
        elif kind == "replace":
            _remove(out, parts)
            _add(out, parts, op["value"])
        else:
            raise BadRequest(f"unknown JSON Patch op {kind!r}", location=op["path"])
    return out


def _add(doc: Any, parts: list[str], value: Any) -> None:
    node, last = _parent(doc, parts, "add")
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and (last == "-" or (last.isdigit() and int(last) <= len(node))):
        node.insert(len(node) if last == "-" else int(last), value)
    else:
        raise Unprocessable("add: bad target", location="/" + "/".join(parts))


def _remove(doc: Any, parts: list[str]) -> None:
    node, last = _parent(doc, parts, "remove")
    if isinstance(node, dict) and last in node:
        del node[last]
    elif isinstance(node, list) and last.isdigit() and int(last) < len(node):
        del node[int(last)]
    else:
        raise Unprocessable("remove: path does not exist", location="/" + "/".join(parts))


_ARCHIVE_PATH = re.compile(r"^DocumentReference\.extension\.where\(url\s*=\s*'([^']+)'\)(?:\.value)?$")


def fhirpath_patch(doc: dict[str, Any], parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The FHIRPath Patch forms PDSm uses (a Parameters resource) on status, securityLabel, archive."""
    out: dict[str, Any] = orjson.loads(orjson.dumps(doc))
    for param in parameters.get("parameter") or ():
        if not isinstance(param, dict) or param.get("name") != "operation":
            raise BadRequest("a FHIRPath Patch holds operation parameters")
        parts = {p.get("name"): p for p in param.get("part") or () if isinstance(p, dict)}
        kind = (parts.get("type") or {}).get("valueCode")
        path = str((parts.get("path") or {}).get("valueString", ""))
        name = (parts.get("name") or {}).get("valueString")
        value_part = parts.get("value") or {}
        value = next((v for k, v in value_part.items() if k.startswith("value")), None)
        archive = _ARCHIVE_PATH.match(path)
        if path == "DocumentReference.status" and kind == "replace":
            out["status"] = value
        elif path == "DocumentReference.securityLabel" and kind == "replace":
            out["securityLabel"] = [value]
        elif path == "DocumentReference.securityLabel" and kind == "delete":
            out.pop("securityLabel", None)
        elif path == "DocumentReference" and kind == "add" and name == "securityLabel":
            out.setdefault("securityLabel", []).append(value)
        elif archive and archive[1] == IS_ARCHIVED and kind in ("replace", "add"):
            _set_archived(out, value is True)
        else:
            raise MethodNotAllowed(
                f"FHIRPath Patch {kind} on {path or name!r}: only status, securityLabel and"
                " the isArchived extension may change",
                location=path or "parameter",
            )
    return out


def _set_archived(doc: dict[str, Any], value: bool) -> None:
    exts = [
        e for e in doc.get("extension") or () if not (isinstance(e, dict) and e.get("url") == IS_ARCHIVED)
    ]
    exts.append({"url": IS_ARCHIVED, "valueBoolean": value})
    doc["extension"] = exts


def _fixed_part(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What a metadata update may not change: everything but status, securityLabel, isArchived."""
    out = {k: v for k, v in doc.items() if k not in ("status", "securityLabel", "meta")}
    exts = [
        e for e in doc.get("extension") or () if not (isinstance(e, dict) and e.get("url") == IS_ARCHIVED)
    ]
    out.pop("extension", None)
    if exts:
        out["extension"] = exts
    return out


def check_metadata_update(before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    if _fixed_part(before) != _fixed_part(after):
        changed = sorted(
            k for k in set(before) | set(after) if k not in ("meta",) and before.get(k) != after.get(k)
        )
        raise MethodNotAllowed(
            "only status, securityLabel and the isArchived extension may be updated"
            f" (this update changes {', '.join(changed) or 'other elements'})",
            location=f"DocumentReference.{changed[0]}" if changed else "DocumentReference",
        )
    if after.get("status") not in STATUSES:
        raise Unprocessable(
            f"status must be one of {', '.join(STATUSES)}", location="DocumentReference.status"
        )


# -- publishing ------------------------------------------------------------------------------------


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
        for c in _codings(resource.get("code"))
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
            url = f"urn:uuid:{_uuid()}"
            e["fullUrl"] = url
        items.append(url)
    subject = docs[0]["resource"].get("subject") or {}
    list_entry = {
        "fullUrl": f"urn:uuid:{_uuid()}",
        "resource": submission_set(subject, items, identifier=identifier, date=date),
        # Conditional: a replayed message does not make a second SubmissionSet.
        "request": {"method": "POST", "url": "List", "ifNoneExist": f"identifier={URI_SYSTEM}|{identifier}"},
    }
    return {**bundle, "entry": [list_entry, *entries]}


def _uuid() -> str:
    import uuid

    return str(uuid.uuid4())


async def _one_document(ops: DocOps, query: str, where: str) -> str:
    """The one document ``identifier=…`` criteria select (masterIdentifier or identifier)."""
    params = parse_qsl(query, keep_blank_values=True)
    if not params or any(k != "identifier" or not v for k, v in params):
        raise BadRequest("a document is selected by identifier=system|value", location=where)
    ids: set[str] | None = None
    for _, value in params:
        system, code = _split_identifier(value)
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


@dataclass(slots=True)
class _Special:
    """A PATCH or DELETE entry on a DocumentReference: done by the store, after the writes."""

    method: str
    url: str
    patch: Callable[[dict[str, Any]], dict[str, Any]] | None = None


class _Publication:
    """One ITI-65 transaction, inside one write of the repository (``tx``; ``ops`` on the same
    connection)."""

    def __init__(self, store: BaseDocumentStore, tx: common.Transaction, ops: DocOps, actor: Actor) -> None:
        self.store = store
        self.tx = tx
        self.ops = ops
        self.actor = actor
        self.blobs: list[_Blob] = []
        self.inline: list[_Blob] = []  # attachment.data: a Binary is made for them
        self.by_url: dict[str, _Blob] = {}
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
        mine = [_split_identifier(p) for p in self.actor.patients]

        def allowed(system: str | None, value: str) -> bool:
            return any(value == v and (system is None or system == s) for s, v in mine)

        if not isinstance(subject, dict):
            return True  # missing: the document checks answer 422
        ref = subject.get("reference")
        if isinstance(ref, str) and ref.startswith("Patient?"):
            params = parse_qsl(ref.partition("?")[2])
            return bool(params) and all(
                k == "identifier" and allowed(*_split_identifier(v)) for k, v in params
            )
        if isinstance(ref, str):
            return ref in (await _allowed_patients(self.ops, self.actor) or set())
        ident = subject.get("identifier")
        if isinstance(ident, dict):
            return allowed(ident.get("system"), str(ident.get("value", "")))
        return True  # no patient named: the document checks answer 422

    async def _resolved_within_own_record(self, entries: list[Any]) -> None:
        """After resolution: every subject is one of the patient's own records."""
        allowed = await _allowed_patients(self.ops, self.actor) or set()
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
                    data = _b64(resource["data"], "Binary.data")
                except PasserelleError as exc:
                    raise _at(exc, i) from None
                blob = _Blob(data, resource.get("contentType"))
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
            entry["resource"] = _copy(resource)
        return entry

    def _patch_fn(self, i: int, resource: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
        if isinstance(resource, dict) and resource.get("resourceType") == "Parameters":
            return lambda doc: fhirpath_patch(doc, resource)
        if isinstance(resource, dict) and resource.get("resourceType") == "Binary":
            try:
                ops = orjson.loads(_b64(resource.get("data"), "Binary.data"))
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
        found = await _identifier_patients(self.ops, idents)
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
            idents = [_split_identifier(v) for k, v in params if k == "identifier"]
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
                            [_split_identifier(v) for k, v in params if k == "identifier"], patients
                        )
                        continue
                    ids = await self.tx.match(type_, common.criteria(query), 2)
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
            ids = await self.tx.match("DocumentReference", common.criteria(url.partition("?")[2]), 2)
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
                await _check_author(self.ops, self.actor, existing["id"])
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
        for path, valueset, codings in _coded_elements(doc):
            if any(
                store.valuesets.contains(valueset, str(c.get("system")), str(c.get("code"))) for c in codings
            ):
                continue
            shown = ", ".join(f"{c.get('system')}|{c.get('code')}" for c in codings) or "no coding"
            text = f"{shown}: not in {valueset}"
            if store.mode is Mode.DMP:
                raise Unprocessable(text, location=f"{where}.{path}")
            issues.append(_issue("warning", "code-invalid", text, f"{where}.{path}"))

    async def _check_attachment(self, where: str, content: Any, issues: list[dict[str, Any]]) -> None:
        att = content.get("attachment") if isinstance(content, dict) else None
        if not isinstance(att, dict):
            raise Unprocessable("content.attachment is required", location=where)
        if "data" in att:
            blob = _Blob(_b64(att["data"], f"{where}.data"), att.get("contentType"))
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
            match = _BINARY_URL.search(url) if isinstance(url, str) else None
            # A Binary of this Bundle, by its fullUrl or its id (the feed names it Binary/<id>).
            key = url if isinstance(url, str) and url in self.by_url else None
            if key is None and match is not None and f"Binary/{match[1]}" in self.by_url:
                key = f"Binary/{match[1]}"
            if key is not None:
                blob = self.by_url[key]
            elif match and (known := await _known_blob(self.ops, match[1])) is not None:
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
                doc_id = await _one_document(self.ops, ref.partition("?")[2], where)
            except NotFound as exc:
                params = parse_qsl(ref.partition("?")[2])
                if self.actor == FEED and issues is not None and len(params) == 1:
                    system, value = _split_identifier(params[0][1])
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
            or not await _visible(self.ops, self.actor, _patient_of(current[2]), mask_of(current[2]), doc_id)
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
            if not _patient_of(doc):
                raise _at(Unprocessable("subject is not a Patient", location="resource.subject"), i)
            await index_document(self.ops, doc)
            written[i] = doc
        for i, old_id in self.replaces:
            try:
                old = await self.tx.fetch("DocumentReference", old_id)
                assert old is not None and old[2] is not None
                if _patient_of(old[2]) != _patient_of(written[i]):
                    raise Unprocessable(
                        "a document replaces only a document of the same patient",
                        location="resource.relatesTo",
                    )
                superseded = {**old[2], "status": "superseded"}
                await check_metadata_rights(self.ops, self.actor, old_id, old[2], superseded)
                await self._update(old[2], superseded)
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
            doc_id = await _one_document(self.ops, special.url.partition("?")[2], "request.url")
        else:
            doc_id = rest
        current = await self.tx.fetch("DocumentReference", doc_id)
        absent = NotFound(f"DocumentReference/{doc_id} is not known", location="request.url")
        if current is None or current[2] is None:
            raise absent
        before = current[2]
        if not await _visible(self.ops, self.actor, _patient_of(before), mask_of(before), doc_id):
            raise absent
        if special.method == "DELETE":
            after = {**before, "status": "entered-in-error"}
            await _check_author(self.ops, self.actor, doc_id)
        else:
            assert special.patch is not None
            after = special.patch(before)
            check_metadata_update(before, after)
        await check_metadata_rights(self.ops, self.actor, doc_id, before, after)
        stored = await self._update(before, after, validate=special.method == "PATCH")
        return _response(200, "DocumentReference", stored)

    async def _update(
        self, before: Mapping[str, Any], after: dict[str, Any], *, validate: bool = False
    ) -> dict[str, Any]:
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


# -- the store ---------------------------------------------------------------------------------------


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

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def _writing(self, fn: Callable[[common.Transaction, DocOps], Coroutine[Any, Any, Any]]) -> Any: ...

    @abstractmethod
    async def _reading(self, fn: Callable[[DocOps], Coroutine[Any, Any, Any]]) -> Any: ...

    async def publish(
        self, bundle: Mapping[str, Any], actor: Actor, *, need_submission_set: bool = True
    ) -> dict[str, Any]:
        data = _copy(bundle)
        answer: dict[str, Any] = await self._writing(
            lambda tx, ops: _Publication(self, tx, ops, actor).run(
                data, need_submission_set=need_submission_set
            )
        )
        log.info("documents_published", actor=actor.subject, entries=len(answer.get("entry", [])))
        return answer

    async def publish_document(
        self, resource: Mapping[str, Any], actor: Actor
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        doc = _copy(resource)
        if doc.get("resourceType") != "DocumentReference":
            raise BadRequest("ITI-105 takes a DocumentReference", location="resourceType")
        doc.pop("id", None)
        url = f"urn:uuid:{_uuid()}"
        entry = {"fullUrl": url, "resource": doc, "request": {"method": "POST", "url": "DocumentReference"}}
        bundle = with_submission_set(
            {"resourceType": "Bundle", "type": "transaction", "entry": [entry]},
            f"urn:uuid:{_uuid()}",
            str(doc.get("date") or ""),
        )
        if not bundle["entry"][0]["resource"]["date"]:
            bundle["entry"][0]["resource"].pop("date")

        async def run(tx: common.Transaction, ops: DocOps) -> tuple[dict[str, Any], list[dict[str, Any]]]:
            answer = await _Publication(self, tx, ops, actor).run(bundle)
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
        result: SearchResult = await self._reading(lambda ops: _search(ops, query, actor))
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
            patients |= await _identifier_patients(
                ops, [_split_identifier(v) for v in wanted.get("patient.identifier", [])]
            )
            allowed = await _allowed_patients(ops, actor)
            if allowed is not None and not patients <= allowed:
                raise Forbidden("a patient sees their own documents only", location="patient")
            lists = []
            for patient in sorted(patients):
                for item in await ops.patient_lists(patient):
                    if _list_matches(item, wanted) and (shown := await visible_list(ops, actor, item)):
                        lists.append(shown)
            lists.sort(key=lambda r: (str(r.get("date", "")), r["id"]), reverse=True)
            return SearchResult(lists[offset : offset + count], len(lists), [], count, offset)

        result: SearchResult = await self._reading(run)
        return result

    async def allowed_patients(self, actor: Actor) -> set[str] | None:
        """The "Patient/id" records this actor may see; None when it is not limited to some."""
        if actor.patients is None:
            return None
        result: set[str] | None = await self._reading(lambda ops: _allowed_patients(ops, actor))
        return result

    async def read_list(self, id_: str, actor: Actor) -> dict[str, Any] | None:
        """A List (SubmissionSet, Folder...), when it is about a patient this actor may see."""

        async def run(ops: DocOps) -> dict[str, Any] | None:
            found = await ops.body("List", id_)
            if found is None:
                return None
            allowed = await _allowed_patients(ops, actor)
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
            return body if await _visible(ops, actor, patient, int(mask or 0), id_) else None

        result: dict[str, Any] | None = await self._reading(run)
        return result

    async def retrieve(self, binary_id: str, actor: Actor) -> Retrieved | None:
        async def run(ops: DocOps) -> Retrieved | None:
            blob = await _known_blob(ops, binary_id)
            if blob is None:
                return None
            owners = await ops.rows(
                "SELECT d.patient, d.mask, d.id FROM doc_tokens t JOIN doc_index d ON d.id=t.id"
                " WHERE t.param='binary' AND t.value=?",
                (binary_id,),
            )
            if owners:
                for p, m, d in owners:
                    if await _visible(ops, actor, p, m, d):
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
            pub = _Publication(self, tx, ops, actor)
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
            if not await _visible(ops, actor, _patient_of(before), mask_of(before), doc_id):
                raise absent
            after = apply_json_patch(before, operations)
            check_metadata_update(before, after)
            await check_metadata_rights(ops, actor, doc_id, before, after)
            return await pub._update(before, after, validate=True)

        stored: dict[str, Any] = await self._writing(run)
        log.info("document_updated", actor=actor.subject, document=stored["id"])
        return stored

    async def delete(self, id_: str, actor: Actor) -> dict[str, Any]:
        async def run(tx: common.Transaction, ops: DocOps) -> dict[str, Any]:
            current = await tx.fetch("DocumentReference", id_) if ID_RE.fullmatch(id_) else None
            if current is None or current[2] is None:
                raise NotFound(f"DocumentReference/{id_} is not known")
            before = current[2]
            if not await _visible(ops, actor, _patient_of(before), mask_of(before), id_):
                raise NotFound(f"DocumentReference/{id_} is not known")
            await _check_author(ops, actor, id_)
            pub = _Publication(self, tx, ops, actor)
            return await pub._update(before, {**before, "status": "entered-in-error"})

        stored: dict[str, Any] = await self._writing(run)
        log.info("document_deleted", actor=actor.subject, document=stored["id"])
        return stored


async def _search(ops: DocOps, query: DocumentQuery, actor: Actor) -> SearchResult:
    patients = set(query.patient_ids) | await _identifier_patients(ops, query.patient_identifiers)
    allowed = await _allowed_patients(ops, actor)
    if allowed is not None and not patients <= allowed:
        raise Forbidden("a patient sees their own documents only", location="patient")
    if not patients:
        return SearchResult([], 0, [], query.count, query.offset)
    clause, args = query.clause()
    pmarks = ",".join("?" * len(patients))
    smarks = ",".join("?" * len(query.statuses))
    masked, mask_args = "(d.mask & ?)=0", [actor.hidden]
    authored = _authored(actor)
    if authored is not None:
        masked = f"({masked} OR d.id IN ({authored[0]}))"
        mask_args += authored[1]
    where = f"d.patient IN ({pmarks}) AND d.status IN ({smarks}) AND {masked} AND {clause}"
    all_args = [*sorted(patients), *query.statuses, *mask_args, *args]
    total, bodies = await ops.documents(where, all_args, query.count, query.offset)
    return SearchResult(bodies, total, [], query.count, query.offset)


async def _target(ops: DocOps, target: str) -> str:
    if not target.startswith("?"):
        if not ID_RE.fullmatch(target):
            raise NotFound("no such DocumentReference")
        return target
    return await _one_document(ops, target[1:], "identifier")


class _SqliteOps(DocOps):
    """The document tables on a SQLite connection; nothing here suspends (see ``run_sync``)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    async def rows(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.conn.execute(sql, tuple(args)).fetchall()]

    async def body(self, type_: str, id_: str) -> dict[str, Any] | None:
        row = self.conn.execute(
            "SELECT body FROM resources WHERE type=? AND id=? AND deleted=0", (type_, id_)
        ).fetchone()
        return orjson.loads(row[0]) if row is not None else None

    async def store_blob(self, blob: _Blob) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO doc_blobs(sha256, sha1, size, data) VALUES (?,?,?,?)",
            (blob.sha256, blob.sha1, len(blob.data), blob.data),
        )
        self.conn.execute(
            "INSERT OR REPLACE INTO doc_binaries(id, sha256, content_type) VALUES (?,?,?)",
            (blob.binary_id, blob.sha256, blob.content_type or "application/octet-stream"),
        )

    async def write_index(
        self, id_: str, values: tuple[Any, ...], tokens: list[tuple[str, str, str]]
    ) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO doc_index(id, patient, status, date, creation, period_start,"
            " period_end, archived, mask) VALUES (?,?,?,?,?,?,?,?,?)",
            values,
        )
        self.conn.execute("DELETE FROM doc_tokens WHERE id=?", (id_,))
        self.conn.executemany(
            "INSERT OR IGNORE INTO doc_tokens(id, param, system, value) VALUES (?,?,?,?)",
            [(id_, *row) for row in tokens],
        )

    async def documents(
        self, where: str, args: Sequence[Any], count: int, offset: int
    ) -> tuple[int, list[dict[str, Any]]]:
        count_sql = f"SELECT COUNT(*) FROM doc_index d WHERE {where}"  # noqa: S608
        total = self.conn.execute(count_sql, tuple(args)).fetchone()[0]
        rows = self.conn.execute(
            f"SELECT r.body FROM doc_index d JOIN resources r ON r.type='DocumentReference' AND r.id=d.id"  # noqa: S608
            f" WHERE {where} ORDER BY d.date DESC, d.id LIMIT ? OFFSET ?",
            (*args, count, offset),
        ).fetchall()
        return int(total), [orjson.loads(r[0]) for r in rows]

    async def patient_lists(self, patient: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT r.body FROM search_index s JOIN resources r ON r.type=s.type AND r.id=s.id"
            " WHERE s.type='List' AND s.param='patient' AND s.system='' AND s.value=?"
            " AND r.deleted=0",
            (patient,),
        ).fetchall()
        return [orjson.loads(r[0]) for r in rows]

    async def indexed_document(self, id_: str) -> tuple[dict[str, Any], str | None, int | None] | None:
        row = self.conn.execute(
            "SELECT r.body, d.patient, d.mask FROM resources r LEFT JOIN doc_index d ON d.id=r.id"
            " WHERE r.type='DocumentReference' AND r.id=? AND r.deleted=0",
            (id_,),
        ).fetchone()
        return None if row is None else (orjson.loads(row[0]), row[1], row[2])

    async def versions(self, type_: str, id_: str) -> list[Version]:
        rows = self.conn.execute(
            "SELECT version_id, last_updated, body FROM resource_versions WHERE type=? AND id=?"
            " ORDER BY version_id DESC",
            (type_, id_),
        ).fetchall()
        return [Version(int(v), str(t), orjson.loads(b) if b is not None else None) for v, t, b in rows]


class SqliteDocumentStore(BaseDocumentStore):
    """Implements ``DocumentStore`` beside a ``SqliteFhirRepository`` (same file, same writer)."""

    repository: SqliteFhirRepository

    def __init__(
        self,
        repository: SqliteFhirRepository,
        *,
        mode: Mode | str = Mode.PDSM,
        valuesets: ValueSets | None = None,
    ) -> None:
        super().__init__(repository, mode=mode, valuesets=valuesets)
        self.repository = repository  # the SQLite type, for the file and writer it shares
        self._ready = False

    async def open(self) -> None:
        await self.repository.open()
        if self._ready:
            return

        def create(w: _Writer) -> None:
            for statement in _SCHEMA:
                w.conn.execute(statement)

        await self.repository._write(create)
        self._ready = True

    async def _writing(self, fn: Callable[[common.Transaction, DocOps], Coroutine[Any, Any, Any]]) -> Any:
        await self.open()
        return await self.repository._write(lambda w: common.run_sync(fn(w, _SqliteOps(w.conn))))

    async def _reading(self, fn: Callable[[DocOps], Coroutine[Any, Any, Any]]) -> Any:
        await self.open()
        return await self.repository._read(lambda conn: common.run_sync(fn(_SqliteOps(conn))))

    async def bulk_load(self, documents: Iterable[dict[str, Any]], *, now: str) -> int:
        """Load already-valid DocumentReferences (each with id and a Patient subject) fast, for
        benchmarks and migrations: no rule runs, one transaction per call."""
        docs = list(documents)

        def run(w: _Writer) -> int:
            rows = []
            for doc in docs:
                body = {**doc, "meta": {"versionId": "1", "lastUpdated": now}}
                rows.append(("DocumentReference", doc["id"], 1, now, 0, orjson.dumps(body)))
            w.conn.executemany(
                "INSERT OR REPLACE INTO resources(type, id, version_id, last_updated, deleted, body)"
                " VALUES (?,?,?,?,?,?)",
                rows,
            )
            ops = _SqliteOps(w.conn)
            for doc in docs:
                common.run_sync(index_document(ops, doc))
            return len(docs)

        loaded: int = await self.repository._write(run)
        return loaded


def _list_matches(item: Mapping[str, Any], wanted: Mapping[str, list[str]]) -> bool:
    if "status" in wanted and item.get("status") not in wanted["status"]:
        return False
    if "code" in wanted:
        codes = {f"{c.get('system')}|{c.get('code')}" for c in _codings(item.get("code"))}
        codes |= {str(c.get("code")) for c in _codings(item.get("code"))}
        if not codes & set(wanted["code"]):
            return False
    if "identifier" in wanted:
        idents = {
            f"{i.get('system')}|{i.get('value')}" for i in item.get("identifier") or () if isinstance(i, dict)
        }
        idents |= {str(i.get("value")) for i in item.get("identifier") or () if isinstance(i, dict)}
        if not idents & set(wanted["identifier"]):
            return False
    return "source.identifier" not in wanted or bool(
        _source_identifiers(item) & set(wanted["source.identifier"])
    )


def _source_identifiers(item: Mapping[str, Any]) -> set[str]:
    """``system|value`` and ``value`` of the List's source: a logical reference or a contained author."""
    source = item.get("source")
    if not isinstance(source, dict):
        return set()
    found: list[Any] = [source.get("identifier")]
    ref = source.get("reference")
    if isinstance(ref, str) and ref.startswith("#"):
        for contained in item.get("contained") or ():
            if isinstance(contained, dict) and contained.get("id") == ref[1:]:
                found += contained.get("identifier") or []
    out: set[str] = set()
    for ident in found:
        if isinstance(ident, dict) and ident.get("value") is not None:
            out |= {f"{ident.get('system')}|{ident['value']}", str(ident["value"])}
    return out
