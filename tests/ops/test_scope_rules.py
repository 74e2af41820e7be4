"""The pieces under the /fhir access scoping: the compartment criterion and the naming check for
any input, which code lists validation treats as closed, and the receipt-time index of the
message store behind ``/api/messages?since=&until=``."""

from __future__ import annotations

import importlib
import pkgutil
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import fhir.resources.R4B as r4b
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.errors import Forbidden
from gateway.fhir.resource import ID_RE
from gateway.fhir.search import split_value, unescape
from gateway.fhir.validation import closed_codes
from gateway.fhir.validation import model_of as _model
from gateway.http.app import build_app
from gateway.http.auth import TokenTable
from gateway.http.scope import COMPARTMENT_TYPES, Compartment
from gateway.store.fhir import SqliteFhirRepository
from gateway.store.messages.postgres import PostgresStore
from gateway.store.messages.sqlite import SqliteStore
from tests.documents.conftest import FHIR_JSON, TOKENS, Client, auth
from tests.fhir.conftest import FhirOnlyRuntime
from tests.scale.conftest import PG_DSN, require_live

# Text with every character FHIR search escaping cares about.
_TEXT = st.text(alphabet=st.sampled_from("ab19.-:/|,$\\ é"), min_size=1, max_size=12)
_IDENTIFIERS = st.lists(st.tuples(st.none() | _TEXT, _TEXT), min_size=1, max_size=3)


@settings(max_examples=200, deadline=None)
@given(identifiers=_IDENTIFIERS)
def test_the_compartment_criterion_names_exactly_the_callers_identifiers(
    identifiers: list[tuple[str | None, str]],
) -> None:
    compartment = Compartment(tuple(identifiers), frozenset())
    name, value = compartment.criterion("Observation")
    assert name == "patient.identifier"
    assert compartment.criterion("Patient")[0] == "identifier"
    parsed = []
    for token in split_value(value, ","):
        parts = [unescape(p) for p in split_value(token, "|")]
        parsed.append((parts[0], parts[1]) if len(parts) == 2 else (None, parts[0]))
    assert parsed == identifiers


_PATIENT_REFERENCE = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]*)?$")
_ID = st.sampled_from(["own-1", "own-2", "other-1", "x"])
_VALUE = st.one_of(
    _ID,
    _ID.map(lambda i: f"Patient/{i}"),
    _ID.map(lambda i: f"Group/{i}"),
    _ID.map(lambda i: f"https://elsewhere.example/fhir/Patient/{i}/_history/2"),
    st.sampled_from(["own-ins", "|own-ins", "urn:oid:1.2.250.1.213.1.4.8|own-ins", "urn:oid:9|own-ins"]),
    _TEXT,
)
_PARAMS = st.lists(
    st.tuples(
        st.sampled_from(
            ["patient", "subject", "patient.identifier", "subject.identifier", "_id", "identifier", "code"]
        ),
        st.lists(_VALUE, min_size=1, max_size=3).map(",".join),
    ),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(type_=st.sampled_from(["Patient", "Observation"]), params=_PARAMS)
def test_the_naming_check_refuses_every_other_patient(type_: str, params: list[tuple[str, str]]) -> None:
    compartment = Compartment((("urn:oid:1.2.250.1.213.1.4.8", "own-ins"),), frozenset({"own-1", "own-2"}))
    try:
        compartment.check(type_, params)
    except Forbidden:
        return
    # Accepted: every patient the search names (as the repository reads the values) is theirs.
    own = {"own-1", "own-2"}
    for name, raw in params:
        for value in (unescape(v) for v in split_value(raw, ",") if v):
            if type_ == "Patient" and name == "_id":
                assert value in own, value
            elif name in ("patient", "subject"):
                match = _PATIENT_REFERENCE.search(value)
                assert not ID_RE.fullmatch(value) or value in own, (name, value)
                assert match is None or match[1] in own, (name, value)
            elif name in ("patient.identifier", "subject.identifier") or (
                type_ == "Patient" and name == "identifier"
            ):
                assert value in ("own-ins", "|own-ins", "urn:oid:1.2.250.1.213.1.4.8|own-ins"), (name, value)


def test_every_compartment_type_has_the_element_the_index_keeps() -> None:
    for type_ in COMPARTMENT_TYPES:
        model = _model(type_)
        assert model is not None, type_
        fields = {info.alias or name for name, info in model.model_fields.items()}
        assert fields & {"patient", "subject"}, type_


def _code_lists() -> dict[tuple[str, str], Any]:
    found: dict[tuple[str, str], Any] = {}
    for module in pkgutil.iter_modules(r4b.__path__):
        try:
            mod = importlib.import_module(f"fhir.resources.R4B.{module.name}")
        except ImportError:
            continue
        for cls in vars(mod).values():
            if isinstance(cls, type) and cls.__module__ == mod.__name__ and hasattr(cls, "model_fields"):
                for name, info in cls.model_fields.items():
                    extra = info.json_schema_extra
                    if isinstance(extra, dict) and extra.get("enum_values"):
                        found[(cls.__name__, name)] = info
    return found


def test_only_open_code_lists_escape_the_closed_list_check() -> None:
    lists = _code_lists()
    assert len(lists) > 300
    open_ = {key for key, info in lists.items() if closed_codes(info) is None}
    extensible = {key for key, info in lists.items() if "+" in info.json_schema_extra["enum_values"]}
    # The MIME types of CapabilityStatement.format, and Expression.language's "etc.".
    assert open_ - extensible == {("CapabilityStatement", "format"), ("Expression", "language")}
    assert closed_codes(lists[("Identifier", "use")]) == ("usual", "official", "temp", "secondary", "old")


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    repo = SqliteFhirRepository(tmp_path / "fhir.db")
    await repo.open()
    app = build_app(FhirOnlyRuntime(repo), authenticator=TokenTable(TOKENS.values()))
    async with TestClient(TestServer(app, host="127.0.0.1", port=0)) as c:
        yield c
    await repo.close()


def capability(**extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2024-05-14",
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json", "application/fhir+xml"],
        **extra,
    }


async def test_mime_types_are_accepted_where_closed_lists_still_hold(client: Client) -> None:
    headers = {**auth("admin"), "Content-Type": FHIR_JSON}
    resp = await client.put("/fhir/CapabilityStatement/cs1", json=capability(), headers=headers)
    assert resp.status == 201, await resp.text()
    bad = [
        ("CapabilityStatement/cs2", capability(kind="sometimes"), "CapabilityStatement.kind"),
        (
            "Patient/p1",
            {"resourceType": "Patient", "identifier": [{"use": "forever", "value": "1"}]},
            "Patient.identifier[0].use",
        ),
        ("Patient/p2", {"resourceType": "Patient", "gender": "zzz"}, "Patient.gender"),
    ]
    for path, body, where in bad:
        resp = await client.put(f"/fhir/{path}", json=body, headers=headers)
        answer = await resp.json(content_type=None)
        assert resp.status == 422, (path, answer)
        assert answer["issue"][0]["code"] == "code-invalid" and answer["issue"][0]["expression"] == [where]


_PLAN = (
    "EXPLAIN QUERY PLAN SELECT seq FROM messages WHERE received_at>=? AND received_at<=? ORDER BY seq DESC"
)


async def test_the_sqlite_message_store_indexes_the_receipt_time(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "journal.db")
    await store.open()
    await store.close()
    with sqlite3.connect(tmp_path / "journal.db") as conn:
        indexes = {row[1]: row for row in conn.execute("PRAGMA index_list(messages)")}
        assert "messages_received" in indexes
        assert [r[2] for r in conn.execute("PRAGMA index_info(messages_received)")] == ["received_at"]
        plan = " ".join(str(r[3]) for r in conn.execute(_PLAN, (1.0, 2.0)))
        assert "messages_received" in plan


@pytest.mark.live
async def test_the_postgres_message_store_indexes_the_receipt_time() -> None:
    require_live()
    schema = f"t_{uuid.uuid4().hex[:10]}"
    store = PostgresStore(PG_DSN, schema=schema)
    await store.open()
    try:
        conn = await asyncpg.connect(PG_DSN)
        try:
            definition = await conn.fetchval(
                "SELECT indexdef FROM pg_indexes WHERE schemaname=$1 AND indexname='messages_received'",
                schema,
            )
        finally:
            await conn.close()
        assert definition is not None and "(received_at)" in definition
    finally:
        await store.close()
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
