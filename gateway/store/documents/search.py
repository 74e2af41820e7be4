"""Finding documents and their Lists: ITI-67 search parameters parsed into SQL over the document
index, that SQL run for an actor (``search_documents``), and the ITI-66 List criteria.

The parsing is pure (no connection, no I/O), so that every parameter can be property-tested. The
SQL is assembled from constants; caller text travels only in placeholders.

Repeated parameters are ANDed, comma-separated values ORed (FHIR search rules).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.core.errors import BadRequest, Forbidden
from gateway.fhir.resource import ID_RE
from gateway.fhir.search import (
    DEFAULT_COUNT,
    MAX_COUNT,
    MAX_OFFSET,
    bounded_int,
    date_prefix,
    date_range,
    split_value,
    unescape,
)
from gateway.store.documents.access import allowed_patients, authored_sql
from gateway.store.documents.model import STATUSES, Actor
from gateway.store.documents.ops import DocOps, identifier_patients
from gateway.store.documents.valuesets import codings
from gateway.store.fhir_common import SearchResult

# Token parameters: the name clients send → the name rows carry in ``doc_tokens``.
TOKEN_PARAMS = {
    "type": "type",
    "category": "category",
    "event": "event",
    "facility": "facility",
    "setting": "setting",
    "security-label": "security-label",
    "format": "format",
    "identifier": "identifier",
    "author.identifier": "author.identifier",
}
# Reference parameters, matched on "Type/id".
REFERENCE_PARAMS = {"relatesto": "relatesto", "relatesTo": "relatesto", "author": "author"}
# Date parameters → the index column; ``period`` matches by overlap.
DATE_PARAMS = {
    "date": "d.date",
    "creation": "d.creation",
    "period-start": "d.period_start",
    "period-end": "d.period_end",
}
RESULT_PARAMS = ("_count", "_offset")
IGNORED = ("_format", "_pretty")
ALL_PARAMS = (
    "patient",
    "patient.identifier",
    "status",
    "period",
    "isArchived",
    "_id",
    *TOKEN_PARAMS,
    *REFERENCE_PARAMS,
    *DATE_PARAMS,
    *RESULT_PARAMS,
)
# The FHIR type of every search parameter ``parse_document_search`` takes: the CapabilityStatement
# is made from it. ``relatesTo`` is an alias of ``relatesto``.
SEARCH_PARAM_TYPES: dict[str, str] = {
    "patient": "reference",
    "patient.identifier": "token",
    "status": "token",
    "_id": "token",
    "isArchived": "token",
    "period": "date",
    **dict.fromkeys(TOKEN_PARAMS, "token"),
    **{name: "reference" for name in REFERENCE_PARAMS if name != "relatesTo"},
    **dict.fromkeys(DATE_PARAMS, "date"),
}


@dataclass(slots=True)
class DocumentQuery:
    """A parsed ITI-67 search: who (patients), then a WHERE clause over ``doc_index d``."""

    patient_ids: list[str] = field(default_factory=list)  # "Patient/id" from ``patient``
    patient_identifiers: list[tuple[str | None, str]] = field(default_factory=list)  # system|value
    statuses: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    offset: int = 0

    def clause(self) -> tuple[str, list[Any]]:
        """The conditions besides patient and status (those are added by the store)."""
        return (" AND ".join(self.where) if self.where else "1=1", list(self.args))


def _tokens(raw: str, name: str) -> list[tuple[str | None, str | None]]:
    """``system|code``, ``|code``, ``code`` or ``system|`` → (system or None, code or None)."""
    out: list[tuple[str | None, str | None]] = []
    for value in split_value(raw, ","):
        if not value:
            continue
        parts = split_value(value, "|")
        if len(parts) == 1:
            out.append((None, unescape(parts[0])))
        elif len(parts) == 2:
            system, code = (unescape(p) for p in parts)
            if not system and not code:
                raise BadRequest(f"{name}: empty system and code", location=name)
            # "|code" means: a code with no system at all, stored as ''.
            out.append((system, code or None))
        else:
            raise BadRequest(f"{name}: expected system|code, |code or code", location=name)
    return out


def _token_clause(param: str, values: list[tuple[str | None, str | None]]) -> tuple[str, list[Any]]:
    conds: list[str] = []
    args: list[Any] = [param]
    for system, code in values:
        if system is None:
            conds.append("t.value=?")
            args.append(code)
        elif code is None:
            conds.append("t.system=?")
            args.append(system)
        else:
            conds.append("(t.system=? AND t.value=?)")
            args += [system, code]
    sql = (
        "EXISTS (SELECT 1 FROM doc_tokens t WHERE t.id=d.id AND t.param=? AND ("  # noqa: S608
        + " OR ".join(conds)
        + "))"
    )
    return sql, args


def _reference(value: str, name: str) -> str:
    text = unescape(value)
    if "/" in text:
        type_, _, id_ = text.rstrip("/").rpartition("/")
        type_ = type_.rsplit("/", 1)[-1]
        if type_ and ID_RE.fullmatch(id_):
            return f"{type_}/{id_}"
    elif ID_RE.fullmatch(text):
        return f"DocumentReference/{text}" if name == "relatesto" else f"Practitioner/{text}"
    raise BadRequest(f"{name}: expected Type/id", location=name)


def _dates(raw: str, name: str) -> Iterator[tuple[str, str, str | None]]:
    """Each comma-separated date value → (its prefix, the [low, high) its precision covers)."""
    for token in split_value(raw, ","):
        if token:
            prefix, text = date_prefix(token, name)
            yield prefix, *date_range(text, name)


def _date_conditions(raw: str, name: str, column: str) -> tuple[str, list[Any]]:
    conds: list[str] = []
    args: list[Any] = []
    for prefix, low, high in _dates(raw, name):
        if prefix == "eq":
            conds.append(f"({column}>=? AND {column}<?)" if high else f"{column}>=?")
            args += [low, high] if high else [low]
        elif prefix == "ge":
            conds.append(f"{column}>=?")
            args.append(low)
        elif prefix == "gt":
            conds.append(f"{column}>=?" if high else "1=0")  # portable: PostgreSQL wants a boolean
            args += [high] if high else []
        elif prefix == "le":
            conds.append(f"{column}<?" if high else f"{column} IS NOT NULL")
            args += [high] if high else []
        else:
            conds.append(f"{column}<?")
            args.append(low)
    return "(" + " OR ".join(conds) + ")", args


def _period_conditions(raw: str, name: str) -> tuple[str, list[Any]]:
    """``period``: the document's service period (start, end; no end = still running) overlaps."""
    conds: list[str] = []
    args: list[Any] = []
    for prefix, low, high in _dates(raw, name):
        ends_after_low = "(d.period_end IS NULL OR d.period_end>=?)"
        if prefix == "eq":
            conds.append("(d.period_start<? AND " + ends_after_low + ")" if high else ends_after_low)
            args += [high, low] if high else [low]
        elif prefix in ("ge", "gt"):
            conds.append(ends_after_low)
            args.append(high if prefix == "gt" and high else low)
        else:
            conds.append("d.period_start<?")
            args.append(high if prefix == "le" and high else low)
    return "(" + " OR ".join(conds) + ")", args


def parse_document_search(params: Sequence[tuple[str, str]]) -> DocumentQuery:
    """ITI-67 parameters → DocumentQuery; an unknown parameter or a bad value is a BadRequest.

    ``patient`` (or ``patient.identifier``) and ``status`` are required, as ITI-67 says.
    """
    query = DocumentQuery()
    seen: set[str] = set()
    for name, raw in params:
        if name in IGNORED:
            continue
        if name in RESULT_PARAMS and name in seen:
            raise BadRequest(f"{name} given more than once", location=name)
        seen.add(name)
        if raw == "":
            continue
        if name == "_count":
            query.count = bounded_int(name, raw, MAX_COUNT)
        elif name == "_offset":
            query.offset = bounded_int(name, raw, MAX_OFFSET)
        elif name == "patient":
            for value in split_value(raw, ","):
                text = unescape(value)
                if not value:
                    continue
                if ID_RE.fullmatch(text):
                    query.patient_ids.append(f"Patient/{text}")
                elif text.startswith("Patient/") and ID_RE.fullmatch(text[8:]):
                    query.patient_ids.append(text)
                else:
                    raise BadRequest("patient: expected Patient/id or id", location=name)
        elif name == "patient.identifier":
            for system, ident in _tokens(raw, name):
                if ident is None:
                    raise BadRequest("patient.identifier: expected system|value", location=name)
                query.patient_identifiers.append((system, ident))
        elif name == "status":
            for value in split_value(raw, ","):
                if value not in STATUSES:
                    raise BadRequest(
                        f"status: {value!r} is not one of {', '.join(sorted(STATUSES))}", location=name
                    )
                query.statuses.append(value)
        elif name == "_id":
            ids = [unescape(v) for v in split_value(raw, ",") if v]
            query.where.append("d.id IN (" + ",".join("?" * len(ids)) + ")")
            query.args += ids
        elif name in TOKEN_PARAMS:
            values = _tokens(raw, name)
            if values:
                sql, args = _token_clause(TOKEN_PARAMS[name], values)
                query.where.append(sql)
                query.args += args
        elif name in REFERENCE_PARAMS:
            param = REFERENCE_PARAMS[name]
            refs = [_reference(v, param) for v in split_value(raw, ",") if v]
            sql, args = _token_clause(param, [("", ref) for ref in refs])
            query.where.append(sql)
            query.args += args
        elif name in DATE_PARAMS:
            sql, args = _date_conditions(raw, name, DATE_PARAMS[name])
            query.where.append(sql)
            query.args += args
        elif name == "period":
            sql, args = _period_conditions(raw, name)
            query.where.append(sql)
            query.args += args
        elif name == "isArchived":
            if raw not in ("true", "false"):
                raise BadRequest("isArchived: true or false", location=name)
            query.where.append("d.archived=?")
            query.args.append(1 if raw == "true" else 0)
        else:
            raise BadRequest(f"unsupported search parameter {name!r} for DocumentReference", location=name)
    if not query.patient_ids and not query.patient_identifiers:
        raise BadRequest("ITI-67 needs patient or patient.identifier", location="patient")
    if not query.statuses:
        raise BadRequest("ITI-67 needs status", location="status")
    return query


async def search_documents(ops: DocOps, query: DocumentQuery, actor: Actor) -> SearchResult:
    """One page of the documents ``query`` selects that this actor may see (403 when it names a
    patient the actor may not see)."""
    patients = set(query.patient_ids) | await identifier_patients(ops, query.patient_identifiers)
    allowed = await allowed_patients(ops, actor)
    if allowed is not None and not patients <= allowed:
        raise Forbidden("a patient sees their own documents only", location="patient")
    if not patients:
        return SearchResult([], 0, [], query.count, query.offset)
    clause, args = query.clause()
    pmarks = ",".join("?" * len(patients))
    smarks = ",".join("?" * len(query.statuses))
    masked, mask_args = "(d.mask & ?)=0", [actor.hidden]
    authored = authored_sql(actor)
    if authored is not None:
        masked = f"({masked} OR d.id IN ({authored[0]}))"
        mask_args += authored[1]
    where = f"d.patient IN ({pmarks}) AND d.status IN ({smarks}) AND {masked} AND {clause}"
    all_args = [*sorted(patients), *query.statuses, *mask_args, *args]
    total, bodies = await ops.documents(where, all_args, query.count, query.offset)
    return SearchResult(bodies, total, [], query.count, query.offset)


# -- ITI-66: Lists ---------------------------------------------------------------------------------

# ITI-66 search parameters (name → FHIR type); the CapabilityStatement is made from it.
LIST_SEARCH_PARAMS: dict[str, str] = {
    "patient": "reference",
    "patient.identifier": "token",
    "code": "token",
    "status": "token",
    "identifier": "token",
    "source.identifier": "token",
}


def list_matches(item: Mapping[str, Any], wanted: Mapping[str, list[str]]) -> bool:
    """Whether a List meets the ITI-66 criteria besides the patient (``wanted``: name → values)."""
    if "status" in wanted and item.get("status") not in wanted["status"]:
        return False
    if "code" in wanted:
        codes = {f"{c.get('system')}|{c.get('code')}" for c in codings(item.get("code"))}
        codes |= {str(c.get("code")) for c in codings(item.get("code"))}
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
