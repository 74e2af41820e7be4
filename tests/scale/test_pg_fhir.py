"""The FHIR repository's behaviour on both backends: SQLite and PostgreSQL.

The backend-neutral tests of tests/fhir/test_repository.py and tests/fhir/test_write_policy.py
are imported here and run against the ``repo`` fixture below, once per backend; the tests that
looked into the SQLite file are restated over ``Inspect``, which counts rows in either database.
Then what only PostgreSQL has: migrations, several nodes writing at once, the search SQL on real
PostgreSQL for any input.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.core.errors import BadRequest, NotFound, StoreError
from gateway.store.fhir import SqliteFhirRepository
from gateway.store.fhir_common import FhirRepository
from gateway.store.pg_fhir import PgFhirRepository, lock_keys, numbered
from tests.fhir.conftest import INS, IPP, Clock, patient

# Collected here too, with this module's ``repo``: the same assertions on both backends.
from tests.fhir.test_repository import (  # noqa: F401
    NAMES,
    VALUES,
    admission,
    bundle,
    clinic,
    entry,
    test_batch_entries_succeed_or_fail_alone,
    test_batch_entry_failing_midway_leaves_no_half_write,
    test_chained_identifier_search,
    test_concurrent_updates_get_consecutive_versions,
    test_conditional_create,
    test_conditional_create_in_a_transaction_reuses_the_known_patient,
    test_conditional_update,
    test_conditional_update_in_a_transaction_updates_the_match,
    test_conditional_url_may_carry_a_system_url_in_its_query,
    test_create_assigns_id_version_and_last_updated,
    test_empty_values_are_ignored,
    test_if_match_detects_version_conflicts,
    test_include_returns_referenced_resources,
    test_last_updated_prefixes,
    test_last_updated_range_is_anded,
    test_not_a_transaction_bundle,
    test_paging_sort_and_total,
    test_search_by_id_and_identifier,
    test_search_by_reference,
    test_search_identifier_without_system,
    test_transaction_delete_and_get,
    test_transaction_multiple_matches_is_a_conflict,
    test_transaction_resolves_urn_uuid_references,
    test_unsupported_search_is_a_bad_request_naming_the_parameter,
    test_update_keeps_client_meta_and_puts_server_meta_first,
    test_update_rejects_a_mismatched_id_or_type,
)
from tests.fhir.test_write_policy import (  # noqa: F401
    test_merge_by_id_and_after_a_deletion,
    test_merge_clear_removes_an_element,
    test_merge_matching_nothing_creates_the_resource,
    test_merge_sees_references_resolved_and_earlier_entries_written,
    test_plain_put_still_replaces,
    test_replayed_merge_writes_no_new_version,
    test_thin_merge_keeps_what_the_owner_set,
    test_unknown_write_policy_is_refused_naming_request_extension,
)
from tests.scale.conftest import PG_DSN, LiveNames, require_live

_TABLES = ("resources", "resource_versions", "search_index")


class Inspect:
    """Reads a backend's tables directly: what a no-op must leave untouched."""

    def __init__(self, path: Path | None = None, schema: str | None = None) -> None:
        self.path = path
        self.schema = schema

    async def rows(self, sql: str) -> list[tuple[Any, ...]]:
        if self.path is not None:
            conn = sqlite3.connect(self.path)
            try:
                return [tuple(r) for r in conn.execute(sql).fetchall()]
            finally:
                conn.close()
        pg = await asyncpg.connect(PG_DSN, server_settings={"search_path": str(self.schema)})
        try:
            return [tuple(r) for r in await pg.fetch(sql)]
        finally:
            await pg.close()

    async def counts(self) -> tuple[int, ...]:
        return tuple([(await self.rows(f"SELECT COUNT(*) FROM {t}"))[0][0] for t in _TABLES])  # noqa: S608


class PgNames(LiveNames):
    async def cleanup(self) -> None:  # no streams to drop: PostgreSQL only
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.live)])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, clock: Clock
) -> AsyncIterator[tuple[FhirRepository, Inspect]]:
    if request.param == "sqlite":
        lite = SqliteFhirRepository(tmp_path / "fhir.db", clock=clock)
        await lite.open()
        yield lite, Inspect(path=tmp_path / "fhir.db")
        await lite.close()
        return
    require_live()
    names = PgNames()
    pg = PgFhirRepository(PG_DSN, schema=names.schema, clock=clock)
    await pg.open()
    yield pg, Inspect(schema=names.schema)
    await pg.close()
    await names.cleanup()


@pytest.fixture
def repo(backend: tuple[FhirRepository, Inspect]) -> FhirRepository:
    return backend[0]


@pytest.fixture
def inspect(backend: tuple[FhirRepository, Inspect]) -> Inspect:
    return backend[1]


# -- the tests that looked into the SQLite file, on both backends ---------------------------------


async def test_versions_and_history(repo: FhirRepository, inspect: Inspect) -> None:
    first, created = await repo.update("Patient", "pat-1", patient(family="Martin"))
    assert created and first["meta"]["versionId"] == "1"
    second, created = await repo.update("Patient", "pat-1", patient(family="Martin-Lefèvre"))
    assert not created and second["meta"]["versionId"] == "2"
    assert await repo.read("Patient", "pat-1") == second
    assert await repo.delete("Patient", "pat-1")
    assert await repo.is_deleted("Patient", "pat-1") and await repo.read("Patient", "pat-1") is None
    assert not await repo.delete("Patient", "pat-1")
    again, created = await repo.update("Patient", "pat-1", patient())
    assert created and again["meta"]["versionId"] == "4"
    history = await inspect.rows("SELECT version_id, deleted, body IS NULL FROM resource_versions ORDER BY 1")
    assert [(int(v), int(d), bool(n)) for v, d, n in history] == [
        (1, 0, False),
        (2, 0, False),
        (3, 1, True),
        (4, 0, False),
    ]


async def test_unchanged_update_and_replayed_transaction_write_nothing(
    repo: FhirRepository, inspect: Inspect, clock: Clock
) -> None:
    stored, _ = await repo.update("Patient", "p", patient(meta={"profile": ["http://fr-core/Patient"]}))
    first = await repo.transaction(_numbered_obs(admission()))
    before = await inspect.counts()
    clock.set("2030-01-01T00:00:00+00:00")
    echoed = patient(meta={"profile": ["http://fr-core/Patient"], "versionId": "7", "lastUpdated": "2001"})
    assert await repo.update("Patient", "p", echoed) == (stored, False)
    second = await repo.transaction(_numbered_obs(admission()))
    assert await inspect.counts() == before
    assert [e["response"]["status"] for e in second["entry"]] == ["200 OK"] * 3
    for a, b in zip(first["entry"], second["entry"], strict=True):
        assert a["response"]["location"] == b["response"]["location"]


async def test_transaction_is_all_or_nothing(repo: FhirRepository, inspect: Inspect) -> None:
    await repo.update("Patient", "keep", patient(ins="1920375999001"))
    before = await inspect.counts()
    bad = admission()
    bad["entry"].append(entry("GET", "Patient/nobody"))
    with pytest.raises(NotFound) as info:
        await repo.transaction(bad)
    assert info.value.location == "Bundle.entry[3].request.url"
    assert await inspect.counts() == before
    with pytest.raises(BadRequest, match=r"Bundle.entry\[1\]"):
        await repo.transaction(bundle("transaction", entry("PUT", "Patient/ok", patient()), {"x": 1}))
    assert await inspect.counts() == before


def _numbered_obs(b: dict[str, Any]) -> dict[str, Any]:
    b["entry"][2]["resource"]["identifier"] = [{"system": "urn:obs", "value": "O-1"}]
    return b


# -- PostgreSQL only ------------------------------------------------------------------------------


@pytest.fixture
async def pg_names() -> AsyncIterator[PgNames]:
    require_live()
    names = PgNames()
    yield names
    await names.cleanup()


async def test_migrations_are_recorded_and_run_once(pg_names: PgNames) -> None:
    node_a = PgFhirRepository(PG_DSN, schema=pg_names.schema)
    node_b = PgFhirRepository(PG_DSN, schema=pg_names.schema)
    await asyncio.gather(node_a.open(), node_b.open())  # two nodes starting together
    try:
        assert node_a.schema_version == node_b.schema_version == 1
        await node_a.update("Patient", "p", patient())
        assert await node_b.read("Patient", "p") is not None
        rows = await Inspect(schema=pg_names.schema).rows("SELECT version FROM fhir_schema_version")
        assert rows == [(1,)]
    finally:
        await node_a.close()
        await node_b.close()


async def test_unreachable_database_is_a_store_error_naming_the_url() -> None:
    dsn = "postgresql://nobody:secret@127.0.0.1:1/none"
    repo = PgFhirRepository(dsn)
    with pytest.raises(StoreError, match=r"127\.0\.0\.1:1") as info:
        await repo.open()
    assert "secret" not in str(info.value)
    with pytest.raises(StoreError, match="not open"):
        await repo.read("Patient", "p")


async def test_two_nodes_replaying_the_same_bundles_create_each_resource_once(pg_names: PgNames) -> None:
    nodes = [PgFhirRepository(PG_DSN, schema=pg_names.schema, pool_size=6) for _ in range(2)]
    for node in nodes:
        await node.open()
    try:
        visits = [f"V-{i}" for i in range(6)]
        # Every admission twice on each node, all at once: 4 concurrent copies of each Bundle.
        answers = await asyncio.gather(
            *(
                node.transaction(_numbered_obs(admission(v)))
                for v in visits
                for node in nodes
                for _ in range(2)
            )
        )
        assert all(a["type"] == "transaction-response" for a in answers)
        inspect = Inspect(schema=pg_names.schema)
        per_type = dict(await inspect.rows("SELECT type, COUNT(*) FROM resources GROUP BY type"))
        assert per_type == {"Patient": 1, "Encounter": len(visits), "Observation": 1}
        versions = await inspect.rows("SELECT MAX(version_id) FROM resource_versions")
        assert versions == [(1,)]  # the copies changed nothing: no second version anywhere
        patients = {a["entry"][0]["response"]["location"] for a in answers}
        assert len(patients) == 1
    finally:
        for node in nodes:
            await node.close()


async def test_two_nodes_updating_one_resource_get_consecutive_versions(pg_names: PgNames) -> None:
    nodes = [PgFhirRepository(PG_DSN, schema=pg_names.schema, pool_size=4) for _ in range(2)]
    for node in nodes:
        await node.open()
    try:
        await asyncio.gather(
            *(nodes[i % 2].update("Patient", "p", patient(given=f"Léa{i}")) for i in range(16))
        )
        current = await nodes[0].read("Patient", "p")
        assert current is not None and current["meta"]["versionId"] == "16"
        history = await Inspect(schema=pg_names.schema).rows(
            "SELECT version_id FROM resource_versions ORDER BY 1"
        )
        assert [h[0] for h in history] == list(range(1, 17))
        made = await asyncio.gather(
            *(
                nodes[i % 2].create(patient(ipp="IPP-9"), if_none_exist=f"identifier={IPP}|IPP-9")
                for i in range(8)
            )
        )
        assert sum(created for _, created in made) == 1
        assert len({stored["id"] for stored, _ in made}) == 1
    finally:
        for node in nodes:
            await node.close()


def test_lock_keys_meet_whatever_the_system_spelling() -> None:
    with_system = lock_keys("Patient", [("identifier", f"{INS}|2840775123456")])
    without = lock_keys("Patient", [("identifier", "2840775123456")])
    assert with_system == without == ["Patient?identifier=2840775123456"]
    assert lock_keys("Patient", [("identifier", "a,b"), ("_count", "1")]) == [
        "Patient?identifier=a",
        "Patient?identifier=b",
    ]
    assert lock_keys("Encounter", [("_id", "e1")]) == ["Encounter?_id=e1"]


@given(st.lists(st.sampled_from(["a", "?", " ", "$", "'"]), max_size=20).map("".join))
def test_numbered_placeholders(sql: str) -> None:
    out = numbered(sql)
    assert "?" not in out
    assert out.count("$") == sql.count("?") + sql.count("$")


# -- property: on PostgreSQL, any search gives a result or a BadRequest, never an SQL error ---------


@pytest.fixture(scope="module")
def pg_search() -> Iterator[tuple[asyncio.Runner, PgFhirRepository]]:
    require_live()
    names = PgNames()
    runner = asyncio.Runner()
    repo = PgFhirRepository(PG_DSN, schema=names.schema, pool_size=2)
    runner.run(repo.open())
    obs = {"resourceType": "Observation", "status": "final", "subject": {"reference": "Patient/p1"}}
    runner.run(repo.update("Observation", "o1", obs))
    try:
        yield runner, repo
    finally:
        runner.run(repo.close())
        runner.run(names.cleanup())
        runner.close()


@settings(
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.sampled_from(NAMES), st.text(max_size=12)),
            st.one_of(st.text(max_size=30), VALUES),
        ),
        max_size=5,
    ),
    st.sampled_from(["Observation", "Patient", "patient", ""]),
)
@example([("_lastUpdated", "gt9999")], "Observation")
@example([("subject", "p1")], "Observation")
@example([("_id", "\x00")], "Observation")  # PostgreSQL text holds no NUL: a 400, not a 500
@example([("patient.identifier", "a|b"), ("_include", "Observation:subject")], "Observation")
def test_search_on_postgresql_gives_a_result_or_a_bad_request(
    pg_search: tuple[asyncio.Runner, PgFhirRepository], params: list[tuple[str, str]], type_: str
) -> None:
    runner, repo = pg_search
    try:
        result = runner.run(repo.search(type_, params))
    except BadRequest:
        return
    assert 0 <= len(result.matches) <= result.total <= 1
