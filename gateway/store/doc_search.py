"""ITI-67 search parameters for DocumentReference, parsed into SQL over the document index.

Pure parsing: no connection, no I/O, so that every parameter can be property-tested. The SQL is
assembled from constants; caller text travels only in placeholders.

Repeated parameters are ANDed, comma-separated values ORed (FHIR search rules).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.core.errors import BadRequest
from gateway.store.fhir import (
    DEFAULT_COUNT,
    ID_RE,
    MAX_COUNT,
    MAX_OFFSET,
    _date_range,
    _split,
    _unescape,
)

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
STATUSES = frozenset({"current", "superseded", "entered-in-error"})
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
_PREFIXES = ("eq", "ge", "gt", "le", "lt")


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
    for value in _split(raw, ","):
        if not value:
            continue
        parts = _split(value, "|")
        if len(parts) == 1:
            out.append((None, _unescape(parts[0])))
        elif len(parts) == 2:
            system, code = (_unescape(p) for p in parts)
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
    text = _unescape(value)
    if "/" in text:
        type_, _, id_ = text.rstrip("/").rpartition("/")
        type_ = type_.rsplit("/", 1)[-1]
        if type_ and ID_RE.fullmatch(id_):
            return f"{type_}/{id_}"
    elif ID_RE.fullmatch(text):
        return f"DocumentReference/{text}" if name == "relatesto" else f"Practitioner/{text}"
    raise BadRequest(f"{name}: expected Type/id", location=name)


def _date_conditions(raw: str, name: str, column: str) -> tuple[str, list[Any]]:
    conds: list[str] = []
    args: list[Any] = []
    for token in _split(raw, ","):
        if not token:
            continue
        prefix, text = "eq", token
        if token[:2].isalpha():
            prefix, text = token[:2], token[2:]
            if prefix not in _PREFIXES:
                raise BadRequest(f"{name}: unsupported prefix {prefix!r} (eq ge gt le lt)", location=name)
        low, high = _date_range(text, name)
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
    for token in _split(raw, ","):
        if not token:
            continue
        prefix, text = "eq", token
        if token[:2].isalpha():
            prefix, text = token[:2], token[2:]
            if prefix not in _PREFIXES:
                raise BadRequest(f"{name}: unsupported prefix {prefix!r} (eq ge gt le lt)", location=name)
        low, high = _date_range(text, name)
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


def _bounded(name: str, value: str, high: int) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 10:
        raise BadRequest(f"{name} must be a non-negative integer", location=name)
    return min(int(value), high)


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
            query.count = _bounded(name, raw, MAX_COUNT)
        elif name == "_offset":
            query.offset = _bounded(name, raw, MAX_OFFSET)
        elif name == "patient":
            for value in _split(raw, ","):
                text = _unescape(value)
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
            for value in _split(raw, ","):
                if value not in STATUSES:
                    raise BadRequest(
                        f"status: {value!r} is not one of {', '.join(sorted(STATUSES))}", location=name
                    )
                query.statuses.append(value)
        elif name == "_id":
            ids = [_unescape(v) for v in _split(raw, ",") if v]
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
            refs = [_reference(v, param) for v in _split(raw, ",") if v]
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
