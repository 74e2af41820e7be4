"""What every FHIR repository backend shares: search parsing, index rows, and the write logic.

The backends (SQLite in gateway.store.fhir, PostgreSQL in gateway.store.pg_fhir) differ only in
their SQL. The write logic (versioning, idempotent updates, conditional create/update, the merge
write policy of gateway.store.merge, transaction and batch Bundles) is written once, as coroutines
over ``Transaction``: a few primitives each backend implements on one open database transaction.
The PostgreSQL primitives really await the database; the SQLite ones run on its writer thread and
never suspend, so ``run_sync`` drives the same coroutines there without an event loop.

Search parameters (read as FHIR spells them by gateway.fhir.search) parse to one WHERE clause
over ``resources r`` and ``search_index`` with ``?`` placeholders; a ``Dialect`` covers the one
operator that differs between the two databases.
"""

from __future__ import annotations

import functools
import http
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl

import orjson

from gateway.core.errors import (
    BadRequest,
    Conflict,
    NotFound,
    PasserelleError,
)
from gateway.core.ids import new_id
from gateway.fhir.bundle import METHOD_ORDER, EntryRequest, entry_request
from gateway.fhir.outcome import of_error
from gateway.fhir.resource import ID_RE, REFERENCE_RE, TYPE_RE, etag, parse_etag, reference_of, resource_type
from gateway.fhir.search import (
    CHAINED_PARAMS,
    DEFAULT_COUNT,
    MAX_COUNT,
    MAX_OFFSET,
    REFERENCE_PARAMS,
    bounded_int,
    criteria,
    date_prefix,
    date_range,
    split_value,
    unescape,
)
from gateway.store.merge import MERGE, Policy, merge_resource, write_policy

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs in the search SQL: how "the value ends with /id" is written."""

    suffix_op: str  # an operator taking a pattern
    wildcard: str  # the pattern's "any text"


SQLITE = Dialect("GLOB", "*")
POSTGRESQL = Dialect("LIKE", "%")


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One page of a search: the matches, how many match in all, and the ``_include``d resources."""

    matches: list[dict[str, Any]]
    total: int
    included: list[dict[str, Any]] = field(default_factory=list)
    count: int = DEFAULT_COUNT  # the page size actually used (``_count``, capped)
    offset: int = 0


class FhirRepository(Protocol):
    """Where FHIR resources are kept. Callers validate resources; the repository trusts them."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    async def read(self, type_: str, id_: str) -> dict[str, Any] | None:
        """The current version; None when absent or deleted."""
        ...

    async def is_deleted(self, type_: str, id_: str) -> bool:
        """True when the resource existed and its current version is a deletion (HTTP 410)."""
        ...

    async def search(
        self, type_: str, params: Sequence[tuple[str, str]], *, count: int = DEFAULT_COUNT, offset: int = 0
    ) -> SearchResult: ...

    async def transaction(self, bundle: Mapping[str, Any], *, copy: bool = True) -> dict[str, Any]:
        """A ``transaction`` or ``batch`` Bundle → its ``transaction-response``/``batch-response``.

        ``copy=False`` hands the Bundle over: JSON data just parsed, that the caller neither keeps
        nor looks at again, used as it is instead of being copied first.
        """
        ...

    async def create(
        self, resource: Mapping[str, Any], *, if_none_exist: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """(stored, created?): not created when ``if_none_exist`` matched exactly one resource."""
        ...

    async def update(
        self, type_: str, id_: str, resource: Mapping[str, Any], *, if_match: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """(stored, created?); unchanged content writes nothing and returns the current version."""
        ...

    async def conditional_update(
        self, type_: str, query: str, resource: Mapping[str, Any]
    ) -> tuple[dict[str, Any], bool]: ...

    async def delete(self, type_: str, id_: str) -> bool:
        """True when a live resource was deleted; deleting what is absent is not an error."""
        ...


# -- search parameters ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A parsed search: a WHERE clause over ``resources r`` (placeholders only) and result options."""

    type_: str
    where: str
    args: tuple[Any, ...]
    includes: tuple[tuple[str, str | None], ...] = ()  # (reference param, target type or None)
    descending: bool = False
    count: int | None = None
    offset: int | None = None


def _identifier_condition(token: str, name: str, alias: str) -> tuple[str, list[Any]]:
    parts = split_value(token, "|")
    if len(parts) == 1:
        return f"{alias}.value=?", [unescape(parts[0])]
    if len(parts) != 2:
        raise BadRequest(f"{name}: expected system|value, |value or value", location=name)
    system, value = (unescape(p) for p in parts)
    if not value:
        if not system:
            raise BadRequest(f"{name}: empty system and value", location=name)
        return f"{alias}.system=?", [system]
    return f"({alias}.system=? AND {alias}.value=?)", [system, value]


def _identifier_clause(values: list[str], name: str, alias: str) -> tuple[str, list[Any]]:
    sql, args = [], []
    for token in values:
        cond, cargs = _identifier_condition(token, name, alias)
        sql.append(cond)
        args += cargs
    return "(" + " OR ".join(sql) + ")", args


def _reference_target(value: str, name: str, dialect: Dialect) -> tuple[str, str]:
    """A search value → (SQL condition on s.value, argument): "Type/id", a URL ending so, or a bare id."""
    text = unescape(value)
    if ID_RE.fullmatch(text):
        # A bare id may point at any type (``subject``); ids never hold GLOB or LIKE metacharacters.
        if name == "patient":
            return "s.value=?", f"Patient/{text}"
        if name == "encounter":
            return "s.value=?", f"Encounter/{text}"
        return f"s.value {dialect.suffix_op} ?", f"{dialect.wildcard}/{text}"
    match = REFERENCE_RE.search(text)
    if match is None:
        raise BadRequest(f"{name}: expected Type/id or id", location=name)
    return "s.value=?", f"{match[1]}/{match[2]}"


def _date_clause(values: list[str], name: str) -> tuple[str, list[Any]]:
    sql, args = [], []
    for token in values:
        prefix, text = date_prefix(token, name)
        low, high = date_range(text, name)
        if prefix == "eq":
            sql.append("(s.value>=? AND s.value<?)" if high else "s.value>=?")
            args += [low, high] if high else [low]
        elif prefix == "ge":
            sql.append("s.value>=?")
            args.append(low)
        elif prefix == "gt":
            sql.append("s.value>=?" if high else "1=0")
            args += [high] if high else []
        elif prefix == "le":
            sql.append("s.value<?" if high else "1=1")
            args += [high] if high else []
        else:
            sql.append("s.value<?")
            args.append(low)
    return "(" + " OR ".join(sql) + ")", args


# The Patients an identifier condition on ``p`` selects, as "Patient/id" values of ``s``.
_CHAINED_PATIENT = (
    "s.system='' AND s.value IN (SELECT 'Patient/' || p.id FROM search_index p"
    " WHERE p.type='Patient' AND p.param='identifier' AND "
)


def _indexed(cond: str) -> str:
    """Resources of the searched type with an index row (type ?, param ?) that meets ``cond``.

    ``cond`` is built from constants and placeholders only, never from caller text.
    """
    return "r.id IN (SELECT s.id FROM search_index s WHERE s.type=? AND s.param=? AND " + cond + ")"  # noqa: S608


# What ``_parse_search`` makes of the one parameter identifier=system|value.
_ONE_IDENTIFIER = "r.type=? AND r.deleted=0 AND " + _indexed("((s.system=? AND s.value=?))")


def parse_search(type_: str, params: Sequence[tuple[str, str]], dialect: Dialect = SQLITE) -> SearchQuery:
    """Parse search parameters into SQL over ``resources r``; anything unsupported is a BadRequest.

    Repeated parameters are ANDed, comma-separated values ORed. Only placeholders carry caller
    text: the SQL itself is assembled from constants.
    """
    if not TYPE_RE.fullmatch(type_):
        raise BadRequest("not a resource type", location="type")
    if len(params) == 1 and params[0][0] == "identifier":
        # The criteria of a conditional create or update on a business identifier, short-cut:
        # one value (no comma), nothing escaped, exactly one "|" and a value after it.
        raw = params[0][1]
        system, bar, value = raw.partition("|")
        if bar and value and "|" not in value and "," not in raw and "\\" not in raw:
            return SearchQuery(type_, _ONE_IDENTIFIER, (type_, type_, "identifier", system, value))
    return _parse_search(type_, params, dialect)


def _parse_search(type_: str, params: Sequence[tuple[str, str]], dialect: Dialect) -> SearchQuery:
    """``parse_search`` once ``type_`` is checked: every parameter, whatever its form."""
    where: list[str] = ["r.type=?", "r.deleted=0"]
    args: list[Any] = [type_]
    includes: list[tuple[str, str | None]] = []
    descending = False
    count: int | None = None
    offset: int | None = None
    seen: set[str] = set()
    for name, raw in params:
        if name in ("_count", "_offset", "_sort") and name in seen:
            raise BadRequest(f"{name} given more than once", location=name)
        seen.add(name)
        if raw == "":
            continue  # FHIR: a parameter without a value is ignored
        if name == "_count":
            count = bounded_int(name, raw, MAX_COUNT)
            continue
        if name == "_offset":
            offset = bounded_int(name, raw, MAX_OFFSET)
            continue
        if name == "_sort":
            if raw not in ("_lastUpdated", "-_lastUpdated"):
                raise BadRequest("_sort: only _lastUpdated or -_lastUpdated", location=name)
            descending = raw.startswith("-")
            continue
        if name == "_include":
            parts = raw.split(":")
            if (
                len(parts) not in (2, 3)
                or parts[0] != type_
                or parts[1] not in REFERENCE_PARAMS
                or (len(parts) == 3 and not TYPE_RE.fullmatch(parts[2]))
            ):
                raise BadRequest(
                    f"_include: expected {type_}:patient, {type_}:subject or {type_}:encounter",
                    location=name,
                )
            includes.append((parts[1], parts[2] if len(parts) == 3 else None))
            continue
        values = [v for v in split_value(raw, ",") if v]
        if not values:
            continue
        if name == "_id":
            ids = [unescape(v) for v in values]
            where.append("r.id IN (" + ",".join("?" * len(ids)) + ")")
            args += ids
        elif name == "identifier":
            cond, cargs = _identifier_clause(values, name, "s")
            where.append(_indexed(cond))
            args += [type_, name, *cargs]
        elif name in REFERENCE_PARAMS:
            conds, cargs = [], []
            for value in values:
                cond, arg = _reference_target(value, name, dialect)
                conds.append(cond)
                cargs.append(arg)
            where.append(_indexed("s.system='' AND (" + " OR ".join(conds) + ")"))
            args += [type_, name, *cargs]
        elif name in CHAINED_PARAMS:
            cond, cargs = _identifier_clause(values, name, "p")
            where.append(_indexed(_CHAINED_PATIENT + cond + ")"))
            args += [type_, name.split(".")[0], *cargs]
        elif name == "_lastUpdated":
            cond, cargs = _date_clause(values, name)
            where.append(_indexed("s.system='' AND " + cond))
            args += [type_, name, *cargs]
        else:
            raise BadRequest(f"unsupported search parameter {name!r}", location=name)
    return SearchQuery(type_, " AND ".join(where), tuple(args), tuple(includes), descending, count, offset)


# -- scanning (exports) -------------------------------------------------------------------------

SCAN_PAGE = 500


def scan_clause(
    types: Sequence[str] | None, after: tuple[str, str] | None, since: str | None
) -> tuple[str, list[Any]]:
    """The WHERE clause (``?`` placeholders) of a ``scan`` page over ``resources``: live rows of
    ``types`` (None: every type) after the (type, id) cursor, changed after ``since`` (an instant).
    Each form seeks the primary key on both databases (one type: ``type = ? AND id > ?``, which
    SQLite does not make of a row value beside an equality)."""
    where, args = ["deleted=0"], []
    if types is not None and len(types) == 1:
        only = types[0]
        where.append("type = ?")
        args.append(only)
        if after is not None and after[0] > only:
            return "1=0", []
        if after is not None and after[0] == only:
            where.append("id > ?")
            args.append(after[1])
    else:
        if types is not None:
            if not types:
                return "1=0", []
            where.append("type IN (" + ",".join("?" * len(types)) + ")")
            args += list(types)
        if after is not None:
            where.append("(type, id) > (?, ?)")  # a row value: the primary key is sought
            args += [after[0], after[1]]
    if since is not None:
        where.append("last_updated > ?")
        args.append(since)
    return " AND ".join(where), args


# -- writing ----------------------------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


class RepositoryBase(ABC):
    """The repository's writes and export paging, once: a backend runs each write's shared logic
    (``put``, ``create``… on a ``Transaction``) in its writer (``_apply``) and reads a page of
    rows (``_scan_page``)."""

    @abstractmethod
    async def _apply(self, work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
        """Run ``work`` on the backend's Transaction, in the writer's next commit."""

    @abstractmethod
    async def _scan_page(self, where: str, args: list[Any], limit: int) -> list[dict[str, Any]]:
        """The bodies of the rows ``where`` holds (``?`` placeholders), in (type, id) order."""

    async def transaction(self, bundle: Mapping[str, Any], *, copy: bool = True) -> dict[str, Any]:
        data = copy_json(bundle) if copy else bundle
        return await self._apply(lambda tx: process_bundle(tx, data))

    async def create(
        self, resource: Mapping[str, Any], *, if_none_exist: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        data = copy_json(resource)
        stored, created = await self._apply(lambda tx: create(tx, data, if_none_exist))
        return stored.body, created

    async def update(
        self, type_: str, id_: str, resource: Mapping[str, Any], *, if_match: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        data = copy_json(resource)
        stored, created = await self._apply(lambda tx: put(tx, type_, id_, data, if_match=if_match))
        return stored.body, created

    async def conditional_update(
        self, type_: str, query: str, resource: Mapping[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        data = copy_json(resource)
        if resource_type(data) != type_:
            raise BadRequest(f"resourceType does not match {type_}", location="resourceType")
        stored, created = await self._apply(lambda tx: conditional_update(tx, type_, query, data))
        return stored.body, created

    async def delete(self, type_: str, id_: str) -> bool:
        return await self._apply(lambda tx: delete(tx, type_, id_))

    async def scan(
        self,
        types: Sequence[str] | None = None,
        *,
        after: tuple[str, str] | None = None,
        since: str | None = None,
        limit: int = SCAN_PAGE,
    ) -> list[dict[str, Any]]:
        """One page of live resources in (type, id) order, after the cursor ``after``: what an
        export reads, page by page, without holding a table in memory. ``since``: changed after."""
        where, args = scan_clause(types, after, since)
        return await self._scan_page(where, args, limit)


def index_rows(type_: str, id_: str, body: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """The search-index rows of one resource version."""
    rows: dict[tuple[str, str, str, str, str], None] = {}
    last_updated = body.get("meta", {}).get("lastUpdated")
    if isinstance(last_updated, str):
        rows[(type_, id_, "_lastUpdated", "", last_updated)] = None
    for ident in _as_list(body.get("identifier")):
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            system = ident.get("system")
            rows[(type_, id_, "identifier", system if isinstance(system, str) else "", ident["value"])] = None
    for param in REFERENCE_PARAMS:
        for item in _as_list(body.get(param)):
            target = reference_of(item)
            if target is None:
                continue
            rows[(type_, id_, param, "", target)] = None
            if param == "subject" and target.startswith("Patient/"):
                rows[(type_, id_, "patient", "", target)] = None
    return list(rows)


def _content(body: Mapping[str, Any]) -> dict[str, Any]:
    """A resource without the meta elements the server owns: what "unchanged" compares."""
    out = dict(body)
    meta = out.get("meta")
    if isinstance(meta, dict):
        rest = {k: v for k, v in meta.items() if k not in ("versionId", "lastUpdated")}
        if rest:
            out["meta"] = rest
        else:
            out.pop("meta")
    return out


def copy_json(resource: Mapping[str, Any]) -> dict[str, Any]:
    """A deep, JSON-only copy: the caller's object is never kept or changed."""
    try:
        data = orjson.loads(orjson.dumps(resource))
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise BadRequest("the resource is not JSON-serialisable") from exc
    if not isinstance(data, dict):
        raise BadRequest("a resource must be a JSON object")
    return data


@dataclass(slots=True)
class Stored:
    """A version as the repository holds it: its body, version number and lastUpdated."""

    body: dict[str, Any]
    version: int
    last_updated: str


# -- Bundles ------------------------------------------------------------------------------------


Row = tuple[int, bool, dict[str, Any] | None]  # (version, deleted?, body) of a resource's current version


class _Unread:
    """The type of ``UNREAD``: a current version nobody has read yet."""


UNREAD = _Unread()


@dataclass(slots=True)
class _Entry:
    index: int
    req: EntryRequest
    resource: dict[str, Any] | None  # the request's, its urn: references rewritten once known
    target: str | None = None  # the id the entry writes to, decided before any write
    existing: Stored | None = None  # a conditional create that matched
    # The target's current version as planning found it (None: absent, an id just minted), so
    # that the write does not read it a second time; UNREAD when planning did not read it.
    current: Row | _Unread | None = UNREAD
    merge: bool = False  # a PUT merged into what is stored (gateway.store.merge), not replacing it
    clear: tuple[str, ...] = ()  # elements the sender nulled: removed by a merge
    keep: tuple[str, ...] = ()  # elements a merge sets only where nothing is stored


def _entry_of(index: int, raw: Any) -> _Entry:
    req = entry_request(raw)
    policy = write_policy(req.request) if "extension" in req.request else Policy()
    return _Entry(
        index,
        req,
        req.resource,
        merge=policy.kind == MERGE and req.method == "PUT",
        clear=policy.clear,
        keep=policy.keep,
    )


# A ``reference`` whose value is a urn: string, in a resource's compact JSON (orjson's). A key and
# its colon never occur inside a JSON string, where every quote is escaped: each match is a
# ``reference`` element, and the group its whole string value.
_URN_REFERENCE = re.compile(rb'"reference":("urn:[^"\\]*(?:\\.[^"\\]*)*")', re.S)


def _rewrite(resource: dict[str, Any], targets: Mapping[str, str]) -> dict[str, Any]:
    """Every ``reference`` equal to a resolved urn: fullUrl (the keys of ``targets``) becomes the
    final Type/id; the resource itself when none does.

    Done on the resource's JSON, where one C-level search finds the candidates, rather than by
    walking and copying every element in Python.
    """
    blob = orjson.dumps(resource)
    if b'"reference":"urn:' not in blob:
        return resource

    def swap(match: re.Match[bytes]) -> bytes:
        final = targets.get(orjson.loads(match[1]))
        return match[0] if final is None else b'"reference":' + orjson.dumps(final)

    rewritten = _URN_REFERENCE.sub(swap, blob)
    if rewritten == blob:
        return resource
    data: dict[str, Any] = orjson.loads(rewritten)
    return data


@functools.cache
def _status_line(status: int) -> str:
    return f"{status} {http.HTTPStatus(status).phrase}"


def _response(status: int, stored: Stored | None = None, type_: str = "") -> dict[str, Any]:
    response: dict[str, Any] = {"status": _status_line(status)}
    if stored is not None:
        response["location"] = f"{type_}/{stored.body['id']}/_history/{stored.version}"
        response["etag"] = etag(stored.version)
        response["lastModified"] = stored.last_updated
    return {"response": response}


def error_entry(exc: PasserelleError, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """A batch-response entry for a failed request entry."""
    return {
        "response": {
            "status": _status_line(exc.http_status),
            "outcome": result if result is not None else of_error(exc),
        }
    }


def _searchset(result: SearchResult) -> dict[str, Any]:
    entries = [{"resource": r, "search": {"mode": "match"}} for r in result.matches]
    entries += [{"resource": r, "search": {"mode": "include"}} for r in result.included]
    return {"resourceType": "Bundle", "type": "searchset", "total": result.total, "entry": entries}


def _at_entry(exc: PasserelleError, index: int) -> PasserelleError:
    """Name the failing entry in the error, keeping its class (and so its HTTP status)."""
    where = f"Bundle.entry[{index}]"
    inner = exc.location
    exc.location = f"{where}.{inner}" if inner and inner.startswith(("request", "resource")) else where
    exc.message = f"{where}: {exc.message}"
    exc.args = (exc.message,)
    return exc


# -- the write logic, once for every backend ----------------------------------------------------


class Transaction(ABC):
    """One open write transaction of a backend: the primitives the write logic runs on.

    ``now`` is the instant every write of the transaction stamps, taken once the backend holds
    whatever makes the transaction's reads and writes consistent.
    """

    now: str

    @abstractmethod
    async def fetch(self, type_: str, id_: str) -> Row | None:
        """The current version, locked against concurrent writers until the transaction ends."""

    @abstractmethod
    async def store(self, type_: str, id_: str, version: int, body: dict[str, Any] | None) -> None:
        """Write a version (None: a deletion), its history row and its search-index rows."""

    @abstractmethod
    async def match(self, type_: str, params: Sequence[tuple[str, str]], limit: int) -> list[str]:
        """Ids of the live resources the (already checked) criteria select, at most ``limit``."""

    @abstractmethod
    async def find(self, type_: str, params: Sequence[tuple[str, str]]) -> SearchResult:
        """A search inside the transaction (a Bundle's GET entry)."""

    async def fetch_many(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Row]:
        """``fetch`` of several (type, id), each locked as ``fetch`` locks it; absent ones are left
        out. A backend may do it in fewer statements."""
        found: dict[tuple[str, str], Row] = {}
        for type_, id_ in keys:
            row = await self.fetch(type_, id_)
            if row is not None:
                found[(type_, id_)] = row
        return found

    async def match_first(
        self, type_: str, params: Sequence[tuple[str, str]]
    ) -> tuple[list[str], Row | None]:
        """``match`` up to two ids, and ``fetch`` the current version of the first when it is the only
        one. A backend may do both in one statement."""
        ids = await self.match(type_, params, 2)
        return ids, await self.fetch(type_, ids[0]) if len(ids) == 1 else None

    @abstractmethod
    async def savepoint(self) -> None: ...

    @abstractmethod
    async def rollback_savepoint(self) -> None: ...

    @abstractmethod
    async def release_savepoint(self) -> None: ...


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never suspends (SQLite primitives) to its result, loop-free."""
    try:
        coro.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result
    coro.close()
    raise RuntimeError("a synchronous store primitive suspended")


async def put(
    tx: Transaction, type_: str, id_: str, resource: Mapping[str, Any], *, if_match: str | None = None
) -> tuple[Stored, bool]:
    """Create or update ``type_/id_``; (stored, created?). Unchanged content writes nothing."""
    return await _put(tx, type_, id_, resource, if_match, UNREAD)


async def _put(
    tx: Transaction,
    type_: str,
    id_: str,
    resource: Mapping[str, Any],
    if_match: str | None,
    current: Row | _Unread | None,
) -> tuple[Stored, bool]:
    """``put``, given the current version when the caller has just read it (else ``UNREAD``)."""
    if not ID_RE.fullmatch(id_):
        raise BadRequest("invalid id (1-64 of A-Z a-z 0-9 - .)", location="id")
    if resource_type(resource) != type_:
        raise BadRequest(f"resourceType {resource['resourceType']} does not match {type_}")
    if resource.get("id", id_) != id_:
        raise BadRequest("the resource id does not match the URL id", location="id")
    incoming = {"resourceType": type_, "id": id_, **_content(resource)}
    if isinstance(current, _Unread):
        current = await tx.fetch(type_, id_)
    if if_match is not None:
        wanted = parse_etag(if_match)
        if current is None or current[1]:
            raise Conflict(f"If-Match: {type_}/{id_} does not exist", location="If-Match")
        if current[0] != wanted:
            raise Conflict(
                f"version conflict: {type_}/{id_} is at version {current[0]}, not {wanted}",
                location="If-Match",
            )
    if current is not None and current[2] is not None and _content(current[2]) == incoming:
        # Same content: no new version, so a replayed message changes nothing.
        return Stored(current[2], current[0], current[2]["meta"]["lastUpdated"]), False
    version = current[0] + 1 if current is not None else 1
    meta = {"versionId": str(version), "lastUpdated": tx.now}
    extra = incoming.pop("meta", None)
    if isinstance(extra, dict):
        meta.update(extra)
    # incoming's own resourceType and id are these very values: they keep their place and value.
    body = {"resourceType": type_, "id": id_, "meta": meta, **incoming}
    await tx.store(type_, id_, version, body)
    return Stored(body, version, tx.now), current is None or current[1]


async def delete(tx: Transaction, type_: str, id_: str) -> bool:
    current = await tx.fetch(type_, id_)
    if current is None or current[1]:
        return False
    await tx.store(type_, id_, current[0] + 1, None)
    return True


async def create(
    tx: Transaction, resource: Mapping[str, Any], if_none_exist: str | None
) -> tuple[Stored, bool]:
    type_ = resource_type(resource)
    if if_none_exist:
        found = await single_match(tx, type_, if_none_exist)
        if found is not None:
            return found, False
    body = dict(resource)
    body.pop("id", None)  # FHIR: the server assigns the id of a created resource
    return (await _put(tx, type_, new_id(), body, None, None))[0], True


async def single_match(tx: Transaction, type_: str, query: str) -> Stored | None:
    found = await _matched(tx, type_, query)
    if found is None:
        return None
    body = found[2]
    assert body is not None
    return Stored(body, found[0], body["meta"]["lastUpdated"])


async def _matched(tx: Transaction, type_: str, query: str) -> Row | None:
    """The current version of the one live resource the criteria select; None when none does."""
    ids, current = await tx.match_first(type_, criteria(query))
    if len(ids) > 1:
        raise Conflict(
            f"the conditional criteria match more than one {type_} (precondition failed)",
            location="query",
        )
    if not ids:
        return None
    assert current is not None and current[2] is not None
    return current


async def conditional_update(
    tx: Transaction, type_: str, query: str, resource: Mapping[str, Any]
) -> tuple[Stored, bool]:
    found = await _matched(tx, type_, query)
    given = resource.get("id")
    if found is not None:
        assert found[2] is not None
        if given is not None and given != found[2]["id"]:
            raise BadRequest("the resource id differs from the one the criteria match", location="id")
        return await _put(tx, type_, found[2]["id"], resource, None, found)
    if isinstance(given, str):
        return await put(tx, type_, given, resource)
    return await _put(tx, type_, new_id(), resource, None, None)


async def _plan(tx: Transaction, entry: _Entry) -> None:
    """Decide which id each write goes to, so that urn:uuid references can be rewritten first."""
    if entry.req.method == "POST":
        if entry.req.if_none_exist:
            entry.existing = await single_match(tx, entry.req.type_, entry.req.if_none_exist)
        if entry.existing:
            entry.target = entry.existing.body["id"]
        else:
            entry.target, entry.current = new_id(), None  # a fresh id names nothing yet
    elif entry.req.method == "PUT":
        if entry.req.id_ is not None:
            if entry.resource is not None and entry.resource.get("id", entry.req.id_) != entry.req.id_:
                raise BadRequest("resource.id does not match request.url", location="resource.id")
            entry.target = entry.req.id_
        else:
            assert entry.req.query is not None and entry.resource is not None
            found = await _matched(tx, entry.req.type_, entry.req.query)
            found_id = found[2]["id"] if found is not None and found[2] is not None else None
            given = entry.resource.get("id")
            if found_id is not None and given is not None and given != found_id:
                raise BadRequest(
                    "resource.id differs from the one the criteria match", location="resource.id"
                )
            if found_id is not None:
                entry.target, entry.current = found_id, found
            elif isinstance(given, str):
                entry.target = given  # it may name a resource already (a deleted one): read at write
            else:
                entry.target, entry.current = new_id(), None
    elif entry.req.method == "DELETE":
        if entry.req.id_ is not None:
            entry.target = entry.req.id_
        else:
            assert entry.req.query is not None
            found = await _matched(tx, entry.req.type_, entry.req.query)
            entry.target = found[2]["id"] if found is not None and found[2] is not None else None


# The elements that say whose record a resource is.
_PATIENT_ELEMENTS = ("subject", "patient")


def _same_patient(entry: _Entry, current: Row | _Unread | None, incoming: Mapping[str, Any]) -> None:
    """A conditional update found by a business identifier must stay the same patient's: a lab
    that reuses a number for another patient, a movement id equal to another visit's, never move a
    record from one patient to another (the write is refused: the message goes to ERROR)."""
    if isinstance(current, _Unread) or current is None or current[1] or current[2] is None:
        return
    for element in _PATIENT_ELEMENTS:
        before, after = reference_of(current[2].get(element)), reference_of(incoming.get(element))
        if before and after and before != after:
            raise Conflict(
                f"{entry.req.type_}/{current[2].get('id')} found by its identifier belongs to {before}, not "
                f"{after}: the identifier is another patient's (a reused number); not written",
                location=f"{entry.req.type_}.{element}",
            )


async def _execute(tx: Transaction, entry: _Entry) -> dict[str, Any]:
    if entry.req.method == "POST":
        if entry.existing is not None:
            return _response(200, entry.existing, entry.req.type_)
        assert entry.resource is not None and entry.target is not None
        body = dict(entry.resource)
        body.pop("id", None)
        stored, _ = await _put(tx, entry.req.type_, entry.target, body, None, entry.current)
        return _response(201, stored, entry.req.type_)
    if entry.req.method == "PUT":
        assert entry.resource is not None and entry.target is not None
        resource, current = entry.resource, entry.current
        if entry.merge:
            if isinstance(current, _Unread):
                current = await tx.fetch(entry.req.type_, entry.target)  # handed on to _put: read once
            if current is not None and not current[1] and current[2] is not None:
                resource = merge_resource(current[2], resource, entry.clear, entry.keep)
        if entry.req.query is not None:
            if isinstance(current, _Unread):
                current = await tx.fetch(entry.req.type_, entry.target)
            _same_patient(entry, current, resource)
        stored, created = await _put(tx, entry.req.type_, entry.target, resource, entry.req.if_match, current)
        return _response(201 if created else 200, stored, entry.req.type_)
    if entry.req.method == "DELETE":
        if entry.target is not None:
            await delete(tx, entry.req.type_, entry.target)
        return _response(204)
    if entry.req.id_ is not None:
        current = await tx.fetch(entry.req.type_, entry.req.id_)
        if current is None or current[2] is None:
            raise NotFound(f"{entry.req.type_}/{entry.req.id_} is not known", location="request.url")
        body = current[2]
        stored = Stored(body, current[0], body["meta"]["lastUpdated"])
        return {"resource": body, **_response(200, stored, entry.req.type_)}
    found = await tx.find(entry.req.type_, parse_qsl(entry.req.query or "", keep_blank_values=True))
    return {"resource": _searchset(found), **_response(200)}


async def process_bundle(tx: Transaction, bundle: Mapping[str, Any]) -> dict[str, Any]:
    """Runs inside one write transaction. A transaction raises on the first failing entry."""
    if bundle.get("resourceType") != "Bundle":
        raise BadRequest("expected a Bundle", location="resourceType")
    kind = bundle.get("type")
    if kind not in ("transaction", "batch"):
        raise BadRequest("Bundle.type must be transaction or batch", location="Bundle.type")
    raw_entries = bundle.get("entry") or []
    if not isinstance(raw_entries, list):
        raise BadRequest("Bundle.entry must be a list", location="Bundle.entry")
    atomic = kind == "transaction"
    results: list[dict[str, Any] | None] = [None] * len(raw_entries)
    entries: list[_Entry] = []
    for i, raw in enumerate(raw_entries):
        try:
            entry = _entry_of(i, raw)
            await _plan(tx, entry)
        except PasserelleError as exc:
            if atomic:
                raise _at_entry(exc, i) from None
            results[i] = error_entry(_at_entry(exc, i))
            continue
        entries.append(entry)
    targets = {
        e.req.full_url: f"{e.req.type_}/{e.target}"
        for e in entries
        if e.req.full_url
        and e.req.full_url.startswith("urn:")
        and e.target
        and e.req.method in ("POST", "PUT")
    }
    touched: set[tuple[str, str]] = set()  # what the entries run so far wrote (or tried to)
    for entry in sorted(entries, key=lambda e: (METHOD_ORDER[e.req.method], e.index)):
        if entry.resource is not None and targets:
            entry.resource = _rewrite(entry.resource, targets)
        if entry.target is not None:
            key = (entry.req.type_, entry.target)
            if key in touched:
                entry.current = UNREAD  # planning read it before an earlier entry wrote it
            touched.add(key)
        if atomic:
            try:
                results[entry.index] = await _execute(tx, entry)
            except PasserelleError as exc:
                raise _at_entry(exc, entry.index) from None
            continue
        # A batch entry stands alone: a savepoint undoes its half-done writes, the others stay.
        await tx.savepoint()
        try:
            results[entry.index] = await _execute(tx, entry)
        except PasserelleError as exc:
            await tx.rollback_savepoint()
            results[entry.index] = error_entry(_at_entry(exc, entry.index))
        await tx.release_savepoint()
    return {
        "resourceType": "Bundle",
        "type": f"{kind}-response",
        "entry": [r for r in results if r is not None],
    }
