# ruff: noqa: F811 - pytest fixtures are imported by name, then requested as arguments
"""The document store's behaviour on both backends: SQLite and PostgreSQL.

The HTTP-level tests of tests/documents (publish, every search parameter, replacement, archive,
masking per role, author-only delete, patches, visibility) are imported here and run through the
``client`` fixture on the ``repo`` below, once per backend; the tests that looked into the SQLite
file are restated over ``Inspect``. Then the feed: ORU and MDM documents published by the
fhir_repository destination, on PostgreSQL too.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from connectors.fhir_repository import FhirRepositoryDestination
from gateway import config as config_mod
from gateway.core.status import Status
from gateway.hl7.er7 import Message
from gateway.mapping import catalog
from gateway.mapping.engine import Library
from gateway.store.backends import document_store
from gateway.store.documents import FEED, SqliteDocumentStore
from gateway.store.documents.postgres import PgDocumentStore
from gateway.store.fhir_common import FhirRepository
from gateway.store.pg_fhir import PgFhirRepository
from tests.documents.conftest import (  # noqa: F401 - fixtures, with this module's ``repo``
    CDA,
    INS,
    LOINC,
    TOKENS,
    Client,
    client,
    dmp_client,
    document,
    patient_id,
    provide_bundle,
    publish,
    sha1_b64,
)
from tests.documents.mdm_messages import INS as MDM_INS
from tests.documents.mdm_messages import INS_NIR, PDF_V2, mdm
from tests.documents.test_mdm import _config as mdm_config
from tests.documents.test_mdm import _send, _wait_sent

# Collected here too, with this module's ``repo``: the same assertions on both backends.
from tests.documents.test_modes import (  # noqa: F401
    test_dmp_mode_format_and_required_elements,
    test_dmp_mode_rejects_with_the_element_path,
    test_pdsm_mode_accepts_other_codes_with_warnings,
    test_pdsm_mode_conforming_document_has_no_warning,
)
from tests.documents.test_oru_feed import MAPPINGS as ORU_MAPPINGS
from tests.documents.test_oru_feed import PDF, _envelope, oru_with_document
from tests.documents.test_publish import (  # noqa: F401
    test_a_bundle_without_submission_set_is_refused,
    test_bad_base64_is_400,
    test_iti65_publishes_in_request_order_with_locations,
    test_iti105_hash_mismatch_names_the_element,
    test_iti105_simplified_publish,
    test_missing_size_and_hash_are_computed_with_warnings,
    test_other_bundles_still_go_to_the_generic_handler,
    test_patient_by_ipp_or_literal_reference,
    test_publishing_needs_a_professional_or_the_patient,
    test_required_elements_missing_are_errors,
)
from tests.documents.test_rules import (  # noqa: F401
    test_a_patient_sees_only_their_own_record,
    test_archive_flag_by_metadata_update_and_search,
    test_conditional_patch_errors,
    test_delete_by_metadata_update_follows_the_author_rule,
    test_delete_is_logical_and_for_the_author_only,
    test_each_visibility_code_per_role,
    test_json_patch_binary_entry_in_a_bundle,
    test_mask_and_unmask_by_metadata_update,
    test_metadata_update_of_anything_else_is_405,
    test_put_on_a_document_is_405,
    test_replacement_supersedes_the_old_document_in_the_same_transaction,
    test_replacement_without_patch_entry_still_supersedes,
    test_replacing_a_document_of_another_patient_is_refused,
)
from tests.documents.test_search import (  # noqa: F401
    test_author_and_relates_to_by_reference,
    test_bad_searches_are_400,
    test_each_search_parameter,
    test_iti66_lists,
    test_or_and_and,
    test_paging,
    test_patient_by_id_ins_or_ipp_give_the_same,
    test_search_needs_a_caller,
    two,
)
from tests.documents.test_visibility_every_way_in import (  # noqa: F401
    published,
    test_bundle_get_entries_do_not_read_documents_for_limited_callers,
    test_documents_and_bytes_of_another_patient_stay_hidden,
    test_generic_list_search_is_narrowed_for_a_patient,
    test_list_read_follows_the_patient_scope,
)
from tests.scale.conftest import PG_DSN, require_live
from tests.scale.test_pg_fhir import Inspect, PgNames, backend, clock, inspect, repo  # noqa: F401


async def _count(inspect: Inspect, sql: str) -> int:
    return int((await inspect.rows(sql))[0][0])


# -- the tests that looked into the SQLite file, on both backends ---------------------------------


async def test_bytes_are_stored_once_content_addressed(client: Client, inspect: Inspect) -> None:
    status, answer = await publish(
        client, provide_bundle(document(), document(master="urn:oid:1.2.250.1.999.1.2"))
    )
    assert status == 200, answer
    digest = hashlib.sha256(CDA).hexdigest()
    assert await inspect.rows("SELECT sha256, size, data FROM doc_blobs") == [(digest, len(CDA), CDA)]
    assert await _count(inspect, "SELECT COUNT(*) FROM resources WHERE type='Binary'") == 1
    assert await _count(inspect, "SELECT COUNT(*) FROM doc_index") == 2


async def test_size_mismatch_is_422_and_nothing_is_stored(client: Client, inspect: Inspect) -> None:
    bundle = provide_bundle(document(), document(master="urn:oid:1.2.250.1.999.1.2", size=len(CDA) + 1))
    status, answer = await publish(client, bundle)
    assert status == 422
    assert answer["issue"][0]["expression"] == ["Bundle.entry[2].resource.content[0].attachment.size"]
    for table in ("doc_blobs", "doc_binaries", "doc_index", "doc_tokens"):
        assert await _count(inspect, f"SELECT COUNT(*) FROM {table}") == 0  # noqa: S608
    assert await _count(inspect, "SELECT COUNT(*) FROM resources WHERE type<>'Patient'") == 0


async def test_hash_mismatch_is_422_and_nothing_is_stored(client: Client, inspect: Inspect) -> None:
    status, answer = await publish(client, provide_bundle(document(hash_=sha1_b64(b"other bytes"))))
    assert status == 422
    assert answer["issue"][0]["expression"] == ["Bundle.entry[1].resource.content[0].attachment.hash"]
    assert await _count(inspect, "SELECT COUNT(*) FROM doc_blobs") == 0
    assert await _count(inspect, "SELECT COUNT(*) FROM resources WHERE type<>'Patient'") == 0


async def test_a_bad_entry_rolls_the_whole_transaction_back(client: Client, inspect: Inspect) -> None:
    # The second document's patient is unknown: the first one, the List and the bytes go too.
    bad = document(master="urn:oid:1.2.250.1.999.1.2", subject=f"Patient?identifier={INS}|0000000000000")
    status, answer = await publish(client, provide_bundle(document(), bad))
    assert status == 422
    assert answer["issue"][0]["expression"] == ["Bundle.entry[2].resource.subject"]
    assert await _count(inspect, "SELECT COUNT(*) FROM resources WHERE type<>'Patient'") == 0
    assert await _count(inspect, "SELECT COUNT(*) FROM resource_versions WHERE type<>'Patient'") == 0
    for table in ("doc_blobs", "doc_binaries", "doc_index", "doc_tokens"):
        assert await _count(inspect, f"SELECT COUNT(*) FROM {table}") == 0  # noqa: S608


async def test_each_backend_gets_its_own_store(repo: FhirRepository) -> None:
    store = document_store(repo)
    assert store is not None and store.repository is repo
    assert isinstance(store, PgDocumentStore) == isinstance(repo, PgFhirRepository)


# -- the HL7v2 feed, through the fhir_repository destination ----------------------------------------


async def test_oru_document_is_published_through_the_store(repo: FhirRepository, tmp_path: Path) -> None:
    library = Library.load(ORU_MAPPINGS, catalog.available())
    bundle = library.map(Message.parse(oru_with_document())).bundle
    if isinstance(repo, PgFhirRepository):
        settings: dict[str, Any] = {"dsn": PG_DSN, "schema": repo.schema}
    else:
        settings = {"path": str(repo.path)}  # type: ignore[attr-defined]
    destination = FhirRepositoryDestination("repository", settings)
    try:
        result = await destination.send(_envelope(1), orjson.dumps(bundle))
        assert result.status is Status.SENT
        again = await destination.send(_envelope(1), orjson.dumps(bundle))  # a replay
        assert again.status is Status.SENT
    finally:
        await destination.aclose()
    store = document_store(repo)
    assert store is not None
    docs = await repo.search("DocumentReference", [], count=50)
    assert docs.total == 1  # the replay made no second document
    doc = docs.matches[0]
    patient = doc["subject"]["reference"]
    found = await store.search([("patient", patient), ("status", "current")], FEED)
    assert [d["id"] for d in found.matches] == [doc["id"]]
    binary_id = doc["content"][0]["attachment"]["url"].rsplit("/", 1)[1]
    got = await store.retrieve(binary_id, FEED)
    assert got is not None and got.data == PDF and got.content_type == "application/pdf"
    lists = await store.search_lists([("patient", patient), ("code", "submissionset")], FEED)
    assert lists.total == 1  # one SubmissionSet per message, not one per delivery


async def test_mdm_feed_on_postgresql(start_gateway: Any, tmp_path: Path) -> None:
    """The MDM feed of tests/documents/test_mdm.py on a PostgreSQL node: publish, replacement
    (T10), logical delete (T04), an idempotent replay; then the MHD routes serve it."""
    require_live()
    names = PgNames()
    cfg = mdm_config(tmp_path)
    data = dict(cfg.data)
    data["store"] = names.store()
    gw = await start_gateway(config_mod.parse(yaml.safe_dump(data, allow_unicode=True), cfg.file))
    try:
        base = f"http://127.0.0.1:{gw.http_port_bound}/fhir"
        query = f"{base}/DocumentReference?patient.identifier=urn:oid:{INS_NIR}|{MDM_INS}"
        async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {TOKENS['pro']['token']}"}
        ) as http:
            await _send(gw, mdm("T02", "MDM-0001", "58132"))
            await _wait_sent(gw, 1)
            async with http.get(f"{query}&status=current&type=http://loinc.org|11488-4") as resp:
                found = await resp.json(content_type=None)
            assert resp.status == 200 and found["total"] == 1, found
            first = found["entry"][0]["resource"]
            t10 = mdm(
                "T10", "MDM-0002", "58133", parent="58132", data=PDF_V2, kind="application^pdf", result="C"
            )
            await _send(gw, t10)
            await _wait_sent(gw, 2)
            async with http.get(f"{query}&status=superseded") as resp:
                superseded = (await resp.json(content_type=None))["entry"]
            assert [d["resource"]["id"] for d in superseded] == [first["id"]]
            await _send(gw, mdm("T04", "MDM-0003", "58133", data=PDF_V2, kind="application^pdf", result="D"))
            await _wait_sent(gw, 3)
            async with http.get(f"{query}&status=current") as resp:
                assert (await resp.json(content_type=None))["total"] == 0
            async with http.get(f"{query}&status=entered-in-error") as resp:
                assert (await resp.json(content_type=None))["total"] == 1
            async with http.get(f"{base}/DocumentReference/{first['id']}") as resp:
                before = await resp.json(content_type=None)
            await _send(gw, mdm("T02", "MDM-0004", "58132"))
            await _wait_sent(gw, 4)
            async with http.get(f"{base}/DocumentReference/{first['id']}") as resp:
                assert await resp.json(content_type=None) == before  # a replay resurrects nothing
        rows = await Inspect(schema=names.schema).rows("SELECT COUNT(*) FROM doc_index")
        assert rows == [(2,)]
    finally:
        await gw.stop()
        await names.cleanup()


async def test_bulk_load_is_indexed_for_search(repo: FhirRepository, patient_id: str) -> None:
    store = document_store(repo)
    assert isinstance(store, SqliteDocumentStore | PgDocumentStore)
    docs = [
        {
            "resourceType": "DocumentReference",
            "id": f"bulk-{i}",
            "status": "current",
            "subject": {"reference": f"Patient/{patient_id}"},
            "type": {"coding": [{"system": LOINC, "code": "11488-4"}]},
            "date": f"2024-05-1{i}T10:00:00Z",
            "content": [{"attachment": {"contentType": "application/xml", "url": "Binary/none"}}],
        }
        for i in range(3)
    ]
    await store.open()
    assert await store.bulk_load(docs, now="2024-06-01T00:00:00Z") == 3
    params = [("patient", f"Patient/{patient_id}"), ("status", "current"), ("type", f"{LOINC}|11488-4")]
    found = await store.search(params, FEED)
    assert found.total == 3 and [d["id"] for d in found.matches] == ["bulk-2", "bulk-1", "bulk-0"]
    assert (await store.search([*params[:2], ("type", f"{LOINC}|34133-9")], FEED)).total == 0


async def test_two_nodes_feeding_the_same_message_make_one_document() -> None:
    """A redelivered message may be published by two nodes at once: one document, one SubmissionSet."""
    require_live()
    names = PgNames()
    library = Library.load(ORU_MAPPINGS, catalog.available())
    payload = orjson.dumps(library.map(Message.parse(oru_with_document())).bundle)
    nodes = [
        FhirRepositoryDestination("repository", {"dsn": PG_DSN, "schema": names.schema}) for _ in range(2)
    ]
    try:
        results = await asyncio.gather(*(node.send(_envelope(1), payload) for node in nodes))
        assert [r.status for r in results] == [Status.SENT, Status.SENT]
        inspect = Inspect(schema=names.schema)
        assert await _count(inspect, "SELECT COUNT(*) FROM resources WHERE type='DocumentReference'") == 1
        assert await _count(inspect, "SELECT COUNT(*) FROM resources WHERE type='List'") == 1
        assert await inspect.rows("SELECT data FROM doc_blobs") == [(PDF,)]
        assert await _count(inspect, "SELECT COUNT(*) FROM doc_index") == 1
    finally:
        for node in nodes:
            await node.aclose()
        await names.cleanup()
