"""``passerelle import``: NDJSON into a gateway's repository, ids, versions and references kept;
bad lines named by file and line; nothing stored is overwritten unless --replace. And the shipped
mappings' output for the real French messages of the corpus, exported from SQLite and imported
into PostgreSQL unchanged."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.fhir_repository import FhirRepositoryDestination
from gateway.cli import main
from gateway.core.envelope import HL7_V2, Envelope
from gateway.core.errors import BadRequest, DeliveryError, MessageError
from gateway.engine.steps import FhirMapping, StepContext
from gateway.hl7.er7 import Message, split_messages
from gateway.mapping.rules import shipped_mappings
from gateway.store import bulk
from gateway.store.backends import document_store
from gateway.store.bulk import Outcome
from gateway.store.documents import SqliteDocumentStore
from gateway.store.documents.postgres import PgDocumentStore
from gateway.store.fhir import SqliteFhirRepository
from gateway.store.pg_fhir import PgFhirRepository
from gateway.transfer import import_files, parse_line
from tests.fhir.bulk_records import export_everything
from tests.scale.test_pg_fhir import backend, clock, repo  # noqa: F401 - sqlite, and postgresql (live)

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT.parent / "shared" / "corpus"
CONFIG = ROOT / "config.yaml"
INS = "urn:oid:1.2.250.1.213.1.4.8"


def line(resource: dict[str, Any]) -> bytes:
    return orjson.dumps(resource) + b"\n"


def patient(id_: str = "amelie", version: str = "3", family: str = "Lefèvre") -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": id_,
        "meta": {"versionId": version, "lastUpdated": "2024-05-14T08:30:00.123000Z"},
        "identifier": [{"system": INS, "value": "2840775123456"}],
        "name": [{"family": family, "given": ["Amélie"]}],
    }


def observation(id_: str = "glycemie-1") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": id_,
        "meta": {"versionId": "1", "lastUpdated": "2024-05-14T09:00:00.000000Z"},
        "status": "final",
        "code": {"text": "Glycémie à jeun"},
        "subject": {"reference": "Patient/amelie"},
    }


def run_import(tmp_path: Path, *args: str) -> int:
    return main(["import", "--config", str(CONFIG), "--data-dir", str(tmp_path / "var"), *args])


async def stored(tmp_path: Path) -> dict[tuple[str, str], Any]:
    repository = SqliteFhirRepository(tmp_path / "var" / "fhir.db")
    store = SqliteDocumentStore(repository)
    await store.open()
    try:
        return await export_everything(repository, store, tmp_path / "check")
    finally:
        await repository.close()


# -- the command ---------------------------------------------------------------------------------------


def test_import_keeps_ids_versions_and_references(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = tmp_path / "in"
    files.mkdir()
    (files / "Patient.ndjson").write_bytes(line(patient()))
    (files / "Observation.ndjson").write_bytes(line(observation()) + b"\n" + line(observation("glycemie-2")))
    binary = {
        "resourceType": "Binary",
        "id": "cr-consultation",
        "meta": {"versionId": "1", "lastUpdated": "2024-05-14T09:30:00.000000Z"},
        "contentType": "application/pdf",
        "data": base64.b64encode(b"%PDF-1.4 compte rendu").decode(),
    }
    (files / "Binary.ndjson").write_bytes(line(binary))
    assert run_import(tmp_path, str(files)) == 0
    assert "4 created" in capsys.readouterr().out
    found = asyncio.run(stored(tmp_path))
    assert found[("Patient", "amelie")] == patient()
    assert found[("Observation", "glycemie-2")] == observation("glycemie-2")
    assert found[("Binary", "cr-consultation")] == binary  # the bytes back in the document store
    # Once more: everything is there already, with the same content: no conflict, no write.
    assert run_import(tmp_path, str(files)) == 0
    assert "4 already present" in capsys.readouterr().out


def test_bad_lines_are_named_by_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "Patient.ndjson"
    no_version = {**patient("paul"), "meta": {"lastUpdated": "2024-05-14T08:30:00Z"}}
    audit_event = {**patient("trace"), "resourceType": "AuditEvent"}
    path.write_bytes(line(patient()) + b"{pas du json\n" + line(no_version) + b"[1, 2]\n" + line(audit_event))
    assert run_import(tmp_path, str(path)) == 1
    captured = capsys.readouterr()
    assert f"{path}:2: not JSON" in captured.err
    assert f"{path}:3: meta.versionId" in captured.err
    assert f"{path}:4: not a JSON object" in captured.err
    assert f"{path}:5: AuditEvent belongs to the audit trail" in captured.err
    assert "Lefèvre" not in captured.err  # a report names places, never content
    assert "1 created" in captured.out  # the good line went in
    assert asyncio.run(stored(tmp_path))[("Patient", "amelie")] == patient()


def test_other_content_is_a_conflict_unless_replace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "a.ndjson", tmp_path / "b.ndjson"
    first.write_bytes(line(patient()))
    second.write_bytes(line(patient(family="Lefèvre-Martin")))
    assert run_import(tmp_path, str(first)) == 0
    capsys.readouterr()
    assert run_import(tmp_path, str(second)) == 1
    assert f"conflict: {second}:1: Patient/amelie" in capsys.readouterr().err
    assert asyncio.run(stored(tmp_path))[("Patient", "amelie")] == patient()  # left as it was
    assert run_import(tmp_path, "--replace", str(second)) == 0
    assert "1 replaced" in capsys.readouterr().out
    assert asyncio.run(stored(tmp_path))[("Patient", "amelie")] == patient(family="Lefèvre-Martin")
    # The search index follows the replacement: the old version's rows are gone, not doubled.
    assert asyncio.run(identified(tmp_path)) == ["amelie"]


async def identified(tmp_path: Path) -> list[str]:
    repository = SqliteFhirRepository(tmp_path / "var" / "fhir.db")
    await repository.open()
    try:
        found = await repository.search("Patient", [("identifier", f"{INS}|2840775123456")])
        return [str(p["id"]) for p in found.matches]
    finally:
        await repository.close()


async def test_one_batch_naming_a_resource_twice_on_both_backends(repo: Any) -> None:  # noqa: F811
    store = document_store(repo)
    assert store is not None
    await store.open()
    same, other = patient(), patient(family="Lefèvre-Martin")
    outcomes = await bulk.restore(store, [patient(), same, other, observation()])
    assert outcomes == [Outcome.CREATED, Outcome.UNCHANGED, Outcome.CONFLICT, Outcome.CREATED]
    assert (await repo.read("Patient", "amelie")) == patient()
    outcomes = await bulk.restore(store, [other, patient()], replace=True)
    assert outcomes == [Outcome.REPLACED, Outcome.REPLACED]
    assert (await repo.read("Patient", "amelie")) == patient()
    found = await repo.search("Observation", [("subject", "Patient/amelie")])
    assert [o["id"] for o in found.matches] == ["glycemie-1"]


def test_import_help_describes_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["import", "--help"])
    text = capsys.readouterr().out
    for option in ("--config", "--data-dir", "--store", "--replace"):
        assert option in text
    assert text.count("(default") >= 2


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)  # JSON text: no lone surrogate


# -- any line ------------------------------------------------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | TEXT.map(str.encode))
def test_any_line_is_a_resource_or_a_reported_error(raw: bytes) -> None:
    try:
        resource = parse_line(raw)
    except BadRequest as exc:
        message = exc.message
    else:
        message = ""
        assert isinstance(resource, dict) and resource["meta"]["versionId"].isdigit()
    assert message or resource


RESOURCES = st.fixed_dictionaries(
    {
        "resourceType": st.sampled_from(["Patient", "Observation", "Encounter", "Condition"]),
        "id": st.from_regex(r"[A-Za-z0-9\-.]{1,64}", fullmatch=True),
        "meta": st.fixed_dictionaries(
            {
                "versionId": st.integers(1, 10**6).map(str),
                "lastUpdated": st.datetimes(timezones=st.just(UTC)).map(
                    lambda d: d.isoformat().replace("+00:00", "Z")
                ),
            }
        ),
    },
    optional={
        "status": st.sampled_from(["final", "amended"]),
        "text": st.fixed_dictionaries({"div": TEXT}),
    },
)


@given(RESOURCES)
def test_every_well_formed_resource_is_taken_as_it_is(resource: dict[str, Any]) -> None:
    assert parse_line(orjson.dumps(resource)) == resource


@given(RESOURCES, st.sampled_from(["id", "versionId", "lastUpdated", "resourceType"]), TEXT)
def test_a_broken_required_element_is_named(resource: dict[str, Any], name: str, value: str) -> None:
    if name in ("versionId", "lastUpdated"):
        resource["meta"][name] = value + "x"
    else:
        resource[name] = value + " !"
    with pytest.raises(BadRequest) as caught:
        parse_line(orjson.dumps(resource))
    assert caught.value.location is not None and name in caught.value.location


# -- the corpus: the mappings' output, SQLite → NDJSON → PostgreSQL ------------------------------------


def corpus_messages() -> list[bytes]:
    if not CORPUS.is_dir():
        pytest.skip(f"corpus absent: {CORPUS}")
    found = []
    for path in sorted((CORPUS / "ans").glob("*")) + sorted((CORPUS / "ms").glob("*.hl7")):
        if path.is_file() and "_ack" not in path.name:
            found += split_messages(path.read_bytes())
    return found


async def map_into(destination: FhirRepositoryDestination, messages: list[bytes]) -> int:
    """Each message through the shipped mappings and into the repository, as a channel would."""
    settings = {
        "directory": str(shipped_mappings()),
        "timezone": "Europe/Paris",
        "missing_namespace": "sender",
    }
    step = FhirMapping("corpus", settings)
    sent = 0
    for n, raw in enumerate(messages):
        try:
            msg = Message.decode(raw, default_charset="8859/15")
            env = Envelope(
                id=f"corpus-{n}", channel="corpus", source="file", raw=raw, content_type=HL7_V2, sender="",
                control_id=msg.control_id, message_type=f"{msg.message_type}^{msg.trigger}", partition_key="",
                received_at=1_715_000_000.0 + n, trace_id=f"corpus-{n}", charset=msg.charset,
            )  # fmt: skip
            ctx = StepContext(env, msg, env.content_type)
            step(ctx)
            await destination.send(env, ctx.payload())
        except (MessageError, DeliveryError):
            continue  # refused by the mappings or the repository: not part of what is compared
        sent += 1
    return sent


@pytest.mark.live
async def test_corpus_mapped_on_sqlite_reads_the_same_on_postgresql(
    tmp_path: Path, pg_store: tuple[PgFhirRepository, PgDocumentStore]
) -> None:
    messages = corpus_messages()
    destination = FhirRepositoryDestination("repo", {"path": str(tmp_path / "fhir.db")})
    assert await map_into(destination, messages) > len(messages) // 2
    await destination.aclose()
    repository = SqliteFhirRepository(tmp_path / "fhir.db")
    store = SqliteDocumentStore(repository)
    await store.open()
    before = await export_everything(repository, store, tmp_path / "out")
    files = next((tmp_path / "out").iterdir())
    await repository.close()
    assert {"Patient", "Encounter", "Observation", "DocumentReference", "Binary"} <= {t for t, _ in before}
    report = await import_files(pg_store[1], [files])
    assert report.ok and report.created == len(before), report.summary()
    after = await export_everything(pg_store[0], pg_store[1], tmp_path / "back")
    assert set(after) == set(before)
    for key, resource in before.items():
        assert after[key] == resource, key
