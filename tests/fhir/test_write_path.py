"""The repository's cheaper write path against its plain form, which the fast paths must equal.

Each short-cut is checked against what it replaces: splitting, unescaping and query parsing
without escapes, the one-identifier search, the instant's text without strftime, the urn:
reference rewrite done on JSON bytes (against a walk over the resource, as it was done before).
Then whole sequences of Bundles, submitted in group-commit batches, go through the repository
twice: as it is (writes without a savepoint, the current version read once and reused, the match
and its read in one statement) and in its plain form (every write in its savepoint, every current
version read again, match then read); what each caller gets and every table must be the same. On
PostgreSQL too when it is running.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from unittest.mock import patch
from urllib.parse import parse_qsl

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.core.errors import BadRequest, PasserelleError
from gateway.fhir import search
from gateway.fhir.resource import TYPE_RE
from gateway.fhir.search import _split_escaped, instant, query_params, split_value, unescape
from gateway.store import fhir as sqlite_fhir
from gateway.store import fhir_common as common
from gateway.store.fhir import SqliteFhirRepository, _Writer
from gateway.store.fhir_common import (
    FhirRepository,
    _parse_search,
    _rewrite,
    index_rows,
    parse_search,
)
from gateway.store.merge import CLEAR_URL, WRITE_POLICY_URL
from gateway.store.pg_fhir import PgFhirRepository
from tests.scale.conftest import PG_DSN, require_live

# -- the short-cuts, one by one ------------------------------------------------------------------

SEARCH_TEXT = st.text(alphabet="ab|,\\=&%+ é", max_size=12)


@given(SEARCH_TEXT, st.sampled_from(["|", ","]))
def test_split_without_escapes_is_the_escape_aware_split(text: str, sep: str) -> None:
    assert split_value(text, sep) == _split_escaped(text, sep)


@given(SEARCH_TEXT)
def test_unescape_without_backslash_changes_nothing(text: str) -> None:
    assert unescape(text) == re.sub(r"\\(.)", lambda m: m.group(1), text, flags=re.S)


@given(st.text(alphabet="ab=&%+;é 2F", max_size=16))
@example("identifier=urn:oid:1.2|P1")
@example("a=b&&c")
@example("a%3Db=c+d")
def test_query_params_is_parse_qsl(query: str) -> None:
    assert query_params(query) == parse_qsl(query, keep_blank_values=True)


@given(
    st.lists(st.tuples(st.sampled_from(["identifier", "_id", "patient", "_count"]), SEARCH_TEXT), max_size=2),
    st.sampled_from(["Patient", "Encounter"]),
)
@example([("identifier", "urn:oid:1.2|P1")], "Patient")
@example([("identifier", "|P1")], "Patient")
@example([("identifier", "s|")], "Patient")
@example([("identifier", "s|a|b")], "Patient")
@example([("identifier", "s|a,b")], "Patient")
@example([("identifier", "s\\|a")], "Patient")
def test_one_identifier_search_parses_as_any_search(params: list[tuple[str, str]], type_: str) -> None:
    def parsed(parse: Callable[[], common.SearchQuery]) -> Any:
        try:
            return parse()
        except BadRequest as exc:
            return exc.message, exc.location

    assert parsed(lambda: parse_search(type_, params)) == parsed(
        lambda: _parse_search(type_, params, common.SQLITE)
    )


OFFSETS = st.builds(timezone, st.timedeltas(min_value=timedelta(hours=-23), max_value=timedelta(hours=23)))


@given(st.datetimes(timezones=st.one_of(st.none(), st.just(UTC), OFFSETS)))
@example(datetime(999, 12, 31, 23, 0, tzinfo=UTC))
@example(datetime(2024, 5, 14, 8, 30, tzinfo=UTC))
def test_instant_is_the_strftime_text(moment: datetime) -> None:
    try:
        expected = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except (OverflowError, ValueError):
        with pytest.raises((OverflowError, ValueError)):
            instant(moment)
        return
    assert instant(moment) == expected


def walk_rewrite(value: Any, targets: Mapping[str, str]) -> Any:
    """The reference rewrite: every ``reference`` equal to a target, at any depth."""
    if isinstance(value, dict):
        return {
            key: targets[item]
            if key == "reference" and isinstance(item, str) and item in targets
            else walk_rewrite(item, targets)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [walk_rewrite(item, targets) for item in value]
    return value


URNS = ["urn:uuid:a", "urn:uuid:b", 'urn:uuid:"q"', "urn:uuid:\\", "urn:é\n", "urn:"]
STRINGS = st.one_of(
    st.sampled_from([*URNS, "Patient/1", "reference", '"reference":"urn:uuid:a"']), st.text(max_size=8)
)
JSON = st.recursive(
    # what JSON holds: no NaN nor infinity (a request body never carries them)
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-10, 10),
        st.floats(allow_nan=False, allow_infinity=False),
        STRINGS,
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["reference", "subject", "display", "x"]), inner, max_size=3),
    ),
    max_leaves=12,
)


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["subject", "partOf", "reference", "contained", "note"]), JSON, max_size=4
    ),
    st.dictionaries(
        st.sampled_from(URNS), st.sampled_from(["Patient/p1", "Encounter/e.1", 'odd"one']), max_size=3
    ),
)
@example({"subject": {"reference": "urn:uuid:a"}}, {"urn:uuid:a": "Patient/p1"})
@example({"note": [{"text": '"reference":"urn:uuid:a"'}]}, {"urn:uuid:a": "Patient/p1"})
@example({"x": {"reference": 'urn:uuid:"q"'}}, {'urn:uuid:"q"': "Patient/p1"})
def test_rewrite_on_json_is_the_walk(resource: dict[str, Any], targets: dict[str, str]) -> None:
    resource = {"resourceType": "Encounter", **resource}
    before = orjson.dumps(resource)
    rewritten = _rewrite(resource, targets)
    assert rewritten == walk_rewrite(resource, targets)
    assert orjson.dumps(rewritten) == orjson.dumps(walk_rewrite(resource, targets))  # key order too
    assert orjson.dumps(resource) == before  # the resource itself is left as it was


# -- whole Bundles, as they are and in the plain form -------------------------------------------

P_SYS, E_SYS = "urn:oid:1.2.250.1.999.1", "urn:oid:1.2.250.1.999.2"
NOW = datetime(2024, 5, 14, 8, 30, tzinfo=UTC)


def _patient(value: str, family: str, id_: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [{"system": P_SYS, "value": value}],
        "name": [{"family": family}],
    }
    if id_ is not None:
        out["id"] = id_
    return out


@st.composite
def bundle_entries(draw: st.DrawFn, key: int) -> list[dict[str, Any]]:
    """1-4 entries on a few patients and encounters: creates, updates, merges, replays, conflicts,
    errors."""
    entries: list[dict[str, Any]] = []
    patient_urls: list[str] = []
    for i in range(draw(st.integers(1, 4))):
        url = f"urn:uuid:{key}-{i}"
        value = draw(st.sampled_from(["p1", "p2", "p3"]))
        family = draw(st.sampled_from(["A", "B"]))
        kind = draw(
            st.sampled_from(
                [
                    *("put?", "put?", "put?id", "put", "put-match", "post", "post?", "merge?", "merge"),
                    *("enc", "enc", "del", "del?", "get", "get?", "bad"),
                ]
            )
        )
        if kind in ("put?", "put?id"):
            given_id = draw(st.sampled_from(["x1", "x9"])) if kind == "put?id" else None
            resource = _patient(value, family, given_id)
            entries.append(
                {
                    "fullUrl": url,
                    "resource": resource,
                    "request": {"method": "PUT", "url": f"Patient?identifier={P_SYS}|{value}"},
                }
            )
            patient_urls.append(url)
        elif kind in ("put", "put-match"):
            id_ = draw(st.sampled_from(["x1", "x2"]))
            request: dict[str, Any] = {"method": "PUT", "url": f"Patient/{id_}"}
            if kind == "put-match":
                request["ifMatch"] = f'W/"{draw(st.integers(1, 3))}"'
            entries.append({"fullUrl": url, "resource": _patient(value, family, None), "request": request})
            patient_urls.append(url)
        elif kind in ("merge?", "merge"):
            # A thin update merged into what is stored, which may have just been written.
            target = f"Patient?identifier={P_SYS}|{value}" if kind == "merge?" else "Patient/x1"
            request = {
                "method": "PUT",
                "url": target,
                "extension": [{"url": WRITE_POLICY_URL, "valueCode": "merge"}],
            }
            if draw(st.booleans()):
                request["extension"].append({"url": CLEAR_URL, "valueString": "name"})
            resource = {
                "resourceType": "Patient",
                "identifier": [{"system": P_SYS, "value": value}],
                "gender": draw(st.sampled_from(["female", "male"])),
            }
            entries.append({"fullUrl": url, "resource": resource, "request": request})
            patient_urls.append(url)
        elif kind in ("post", "post?"):
            request = {"method": "POST", "url": "Patient"}
            if kind == "post?":
                request["ifNoneExist"] = f"identifier={P_SYS}|{value}"
            entries.append({"fullUrl": url, "resource": _patient(value, family, None), "request": request})
            patient_urls.append(url)
        elif kind == "enc":
            visit = draw(st.sampled_from(["v1", "v2"]))
            subject = draw(st.sampled_from([*patient_urls, "Patient/x1", "urn:uuid:nowhere"]))
            entries.append(
                {
                    "fullUrl": url,
                    "resource": {
                        "resourceType": "Encounter",
                        "identifier": [{"system": E_SYS, "value": visit}],
                        "status": draw(st.sampled_from(["planned", "in-progress"])),
                        "subject": {"reference": subject},
                        "partOf": {"reference": draw(st.sampled_from([url, *patient_urls]))},
                    },
                    "request": {"method": "PUT", "url": f"Encounter?identifier={E_SYS}|{visit}"},
                }
            )
        elif kind == "del":
            entries.append(
                {"request": {"method": "DELETE", "url": f"Patient/{draw(st.sampled_from(['x1', 'x2']))}"}}
            )
        elif kind == "del?":
            entries.append({"request": {"method": "DELETE", "url": f"Patient?identifier={P_SYS}|{value}"}})
        elif kind == "get":
            entries.append({"request": {"method": "GET", "url": "Patient/x1"}})
        elif kind == "get?":
            entries.append({"request": {"method": "GET", "url": f"Patient?identifier={P_SYS}|{value}"}})
        else:  # a PUT without an id or criteria: refused before anything is written
            entries.append(
                {"resource": _patient(value, family, None), "request": {"method": "PUT", "url": "Patient"}}
            )
    return entries


@st.composite
def scenarios(draw: st.DrawFn) -> list[list[dict[str, Any]]]:
    """Batches of Bundles, each batch submitted at once; ``_k`` names a Bundle (ids below)."""
    batches: list[list[dict[str, Any]]] = []
    key = 0
    for _ in range(draw(st.integers(1, 4))):
        batch = []
        for _ in range(draw(st.integers(1, 4))):
            key += 1
            kind = draw(st.sampled_from(["transaction", "transaction", "batch"]))
            batch.append(
                {"resourceType": "Bundle", "type": kind, "_k": key, "entry": draw(bundle_entries(key))}
            )
        batches.append(batch)
    return batches


class _Ids(threading.local):
    key: Any = None
    n = 0


@contextmanager
def deterministic_ids() -> Iterator[None]:
    """Server ids derived from the Bundle being run (its ``_k``) and a count inside it, so that a
    Bundle run again (after a batch is undone) mints the same ids, and both forms compare."""
    ids = _Ids()
    process_bundle = common.process_bundle

    async def keyed(tx: common.Transaction, bundle: Mapping[str, Any]) -> dict[str, Any]:
        ids.key, ids.n = bundle.get("_k"), 0
        return await process_bundle(tx, bundle)

    def new_id() -> str:
        ids.n += 1
        return f"k{ids.key}n{ids.n}"

    with patch.object(common, "process_bundle", keyed), patch.object(common, "new_id", new_id):
        yield


_Current = common.Row | common._Unread | None


def _put_with(adjust: Callable[[common.Transaction, str, str, _Current], Awaitable[_Current]]) -> Any:
    """``common._put``, given the current version ``adjust`` makes of the one the write path passes."""
    put = common._put

    async def wrapped(
        tx: common.Transaction,
        type_: str,
        id_: str,
        resource: Mapping[str, Any],
        if_match: str | None,
        current: _Current,
    ) -> tuple[common.Stored, bool]:
        return await put(tx, type_, id_, resource, if_match, await adjust(tx, type_, id_, current))

    return wrapped


@contextmanager
def checked_reuse() -> Iterator[None]:
    """As it is, but every current version the write path reuses is checked against the database."""

    async def checked(tx: common.Transaction, type_: str, id_: str, current: _Current) -> _Current:
        if not isinstance(current, common._Unread):
            assert current == await tx.fetch(type_, id_), f"stale current version of {type_}/{id_}"
        return current

    with patch.object(common, "_put", _put_with(checked)):
        yield


@contextmanager
def plain_form() -> Iterator[None]:
    """The write path without its short-cuts: what it was before them."""

    async def reread(tx: common.Transaction, type_: str, id_: str, current: _Current) -> _Current:
        return common.UNREAD

    def parse(type_: str, params: Any, dialect: common.Dialect = common.SQLITE) -> common.SearchQuery:
        if not TYPE_RE.fullmatch(type_):
            raise BadRequest("not a resource type", location="type")
        return _parse_search(type_, params, dialect)

    with ExitStack() as stack:
        stack.enter_context(patch.object(common, "_put", _put_with(reread)))
        stack.enter_context(patch.object(common, "_rewrite", walk_rewrite))
        stack.enter_context(
            patch.object(search, "query_params", lambda q: parse_qsl(q, keep_blank_values=True))
        )
        stack.enter_context(patch.object(common, "parse_search", parse))
        stack.enter_context(patch.object(sqlite_fhir, "parse_search", parse))
        stack.enter_context(patch.object(_Writer, "match_first", common.Transaction.match_first))
        # Every write in its own savepoint, as every write used to be.
        stack.enter_context(patch.object(SqliteFhirRepository, "_run_bare", SqliteFhirRepository._run_one))
        yield


def outcome_of(result: Any) -> Any:
    if isinstance(result, PasserelleError):
        return type(result).__name__, result.message, result.location
    assert isinstance(result, dict), result
    return result


async def run_scenario(
    repo: FhirRepository, batches: list[list[dict[str, Any]]], *, concurrently: bool
) -> list[Any]:
    out: list[Any] = []
    for batch in batches:
        if concurrently:  # one loop turn: one group commit
            results = await asyncio.gather(*(repo.transaction(b) for b in batch), return_exceptions=True)
        else:
            results = []
            for b in batch:
                try:
                    results.append(await repo.transaction(b))
                except PasserelleError as exc:
                    results.append(exc)
        out += [outcome_of(r) for r in results]
    return out


def sqlite_tables(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(path)
    try:
        tables = {
            t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr)  # noqa: S608
            for t in ("resources", "resource_versions", "search_index")
        }
    finally:
        conn.close()
    # The index holds exactly the rows of the current versions, nothing left of earlier ones.
    expected = sorted(
        (
            row
            for t, i, _, _, deleted, body in tables["resources"]
            if not deleted
            for row in index_rows(t, i, orjson.loads(body))
        ),
        key=repr,
    )
    assert tables["search_index"] == expected
    return tables


async def sqlite_run(path: Path, batches: list[list[dict[str, Any]]]) -> tuple[list[Any], int]:
    repo = SqliteFhirRepository(path, clock=lambda: NOW)
    await repo.open()
    try:
        return await run_scenario(repo, batches, concurrently=True), repo.commits
    finally:
        await repo.close()


@settings(database=None, deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_bundles_as_they_are_and_in_the_plain_form_agree_on_sqlite(
    batches: list[list[dict[str, Any]]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp, deterministic_ids():
        fast, plain = Path(tmp) / "fast.db", Path(tmp) / "plain.db"
        with checked_reuse():
            fast_answers, fast_commits = asyncio.run(sqlite_run(fast, batches))
        with plain_form():
            plain_answers, plain_commits = asyncio.run(sqlite_run(plain, batches))
        assert fast_answers == plain_answers
        assert fast_commits == plain_commits == len(batches)  # a batch undone and run again: one commit
        assert sqlite_tables(fast) == sqlite_tables(plain)


async def _admission_once(repo: SqliteFhirRepository, n: int) -> dict[str, Any]:
    url = f"urn:uuid:{n}"
    return await repo.transaction(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": url,
                    "resource": _patient(f"p{n}", "A", None),
                    "request": {"method": "PUT", "url": f"Patient?identifier={P_SYS}|p{n}"},
                },
                {
                    "resource": {
                        "resourceType": "Encounter",
                        "identifier": [{"system": E_SYS, "value": f"v{n}"}],
                        "status": "in-progress",
                        "subject": {"reference": url},
                    },
                    "request": {"method": "PUT", "url": f"Encounter?identifier={E_SYS}|v{n}"},
                },
            ],
        }
    )


async def test_a_batch_runs_without_savepoints_unless_a_write_fails_after_changing_rows(
    tmp_path: Path,
) -> None:
    repo = SqliteFhirRepository(tmp_path / "fhir.db")
    await repo.open()
    statements: list[str] = []
    try:
        conn = await asyncio.get_running_loop().run_in_executor(repo._wexec, repo._conn)
        conn.set_trace_callback(statements.append)
        await asyncio.gather(*(_admission_once(repo, n) for n in range(5)))
        assert not [s for s in statements if s.startswith(("SAVEPOINT", "ROLLBACK"))]
        # Refused before writing anything (two matches): still no savepoint, the others stored.
        await repo.update("Patient", "twin", _patient("p0", "B", None))
        statements.clear()
        refused, stored = await asyncio.gather(
            _admission_once(repo, 0), _admission_once(repo, 9), return_exceptions=True
        )
        assert isinstance(refused, PasserelleError) and isinstance(stored, dict)
        assert not [s for s in statements if s.startswith(("SAVEPOINT", "ROLLBACK"))]
        # Refused after writing its first entry: the batch is undone and run again in savepoints.
        statements.clear()
        half = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": _patient("p7", "A", None), "request": {"method": "PUT", "url": "Patient/half"}},
                {
                    "resource": _patient("p8", "A", None),
                    "request": {"method": "PUT", "url": "Patient/twin", "ifMatch": 'W/"9"'},
                },
            ],
        }
        failed, fine = await asyncio.gather(
            repo.transaction(half), _admission_once(repo, 10), return_exceptions=True
        )
        assert isinstance(failed, PasserelleError) and isinstance(fine, dict)
        assert "ROLLBACK" in statements and "SAVEPOINT write" in statements
        assert await repo.read("Patient", "half") is None
        assert (await repo.search("Patient", [("identifier", f"{P_SYS}|p10")])).total == 1
    finally:
        await repo.close()


# -- PostgreSQL: the same comparison, one write at a time -------------------------------------------


def _pg_run(batches: list[list[dict[str, Any]]], form: Callable[[], Any]) -> tuple[list[Any], dict[str, Any]]:
    schema = f"t_{uuid.uuid4().hex[:10]}"

    async def go() -> tuple[list[Any], dict[str, Any]]:
        repo = PgFhirRepository(PG_DSN, schema=schema, pool_size=1, clock=lambda: NOW)
        await repo.open()
        try:
            with form():
                answers = await run_scenario(repo, batches, concurrently=False)
            conn = await asyncpg.connect(PG_DSN)
            try:
                tables = {
                    t: sorted(
                        (tuple(r) for r in await conn.fetch(f'SELECT * FROM "{schema}".{t}')),  # noqa: S608
                        key=repr,
                    )
                    for t in ("resources", "resource_versions", "search_index")
                }
            finally:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
                await conn.close()
            return answers, tables
        finally:
            await repo.close()

    return asyncio.run(go())


@pytest.mark.live
@settings(database=None, deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_bundles_as_they_are_and_in_the_plain_form_agree_on_postgresql(
    batches: list[list[dict[str, Any]]],
) -> None:
    require_live()
    with deterministic_ids():
        fast = _pg_run(batches, checked_reuse)
        plain = _pg_run(batches, plain_form)
    assert fast == plain
