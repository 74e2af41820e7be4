"""The DocumentStore contract (gateway.store.documents), on SQLite and PostgreSQL.

Publication (ITI-65, ITI-105) all or nothing, reads and retrieval of the bytes, search (ITI-67,
ITI-66), replacement and versions, metadata updates and deletion by the author, and who sees what
(visibility masks, a patient's own record). Then the access rules through HTTP.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.errors import BadRequest, Forbidden, NotFound, PasserelleError
from gateway.store.documents import (
    INVISIBLE_PATIENT,
    IS_ARCHIVED,
    MASQUE_PS,
    Actor,
    BaseDocumentStore,
)
from gateway.store.fhir_common import FhirRepository
from tests.documents.conftest import (
    CDA,
    CONFIDENTIALITY,
    IDNPS,
    OTHER_INS,
    OTHER_RPPS,
    PATIENT_INS,
    PRO_RPPS,
    client,  # noqa: F401 - the HTTP client on this module's ``repo``
    document,
    patient_id,  # noqa: F401
    patient_resource,
    provide_bundle,
    visibility,
)

# Moved here so that they run on every backend: status, visibility, masks, Lists, versions.
from tests.documents.test_audience import (  # noqa: F401
    test_a_token_with_both_audiences_reads_no_masked_document,
)
from tests.documents.test_document_versions import (  # noqa: F401
    test_a_metadata_update_stores_nothing_invalid,
    test_document_versions_are_read_with_the_documents_rules,
    test_iti105_and_iti65_refuse_what_the_models_let_through,
    test_versions_of_lists_and_other_records_follow_the_callers_scope,
)
from tests.documents.test_list_masking import (  # noqa: F401
    lists,
    test_another_professional_sees_no_entry_or_list_of_a_masked_document,
    test_audience_masks_hide_lists_too,
    test_list_reads_follow_the_same_rule,
    test_the_author_and_unrestricted_callers_see_every_entry,
    test_the_patient_sees_no_list_of_a_document_hidden_from_them,
)
from tests.documents.test_metadata_rights import (  # noqa: F401
    test_a_masked_document_is_not_found_by_a_bundle_patch_of_who_may_not_see_it,
    test_a_professional_who_is_not_the_author_changes_no_status_or_visibility,
    test_the_author_changes_status_and_visibility,
    test_the_patient_masks_and_unmasks_from_professionals_only,
    test_the_patient_patches_only_their_own_documents,
    test_the_patient_still_cannot_read_what_another_professional_tried_to_unhide,
    test_transaction_bundles_follow_the_same_rules,
)
from tests.fhir.conftest import INS

# The actors the HTTP layer makes of its callers (gateway.http.documents.actor_for).
AUTHOR = Actor(hidden=MASQUE_PS, practitioner=f"{IDNPS}|8{PRO_RPPS}", subject="pro-1")
OTHER_PRO = Actor(hidden=MASQUE_PS, practitioner=f"{IDNPS}|8{OTHER_RPPS}", subject="pro-2")
PATIENT = Actor(hidden=INVISIBLE_PATIENT, patients=(f"{INS}|{PATIENT_INS}",), subject="patient-1")
OTHER_PATIENT = Actor(hidden=INVISIBLE_PATIENT, patients=(f"{INS}|{OTHER_INS}",), subject="patient-2")
ADMIN = Actor(subject="admin-1", may_delete_any=True)

MINE = ("patient.identifier", f"{INS}|{PATIENT_INS}")
CURRENT = ("status", "current")  # ITI-67 needs a status


@pytest.fixture
async def patients(repo: FhirRepository) -> tuple[str, str]:
    """The patient of the documents and another one, as Patient ids."""
    mine, _ = await repo.create(patient_resource())
    other, _ = await repo.create(patient_resource(OTHER_INS, "100002", "Martin"))
    return str(mine["id"]), str(other["id"])


def doc_id(answer: dict[str, Any], index: int = 1) -> str:
    return str(answer["entry"][index]["response"]["location"]).split("/")[1]


def found(result: Any) -> list[str]:
    return [r["id"] for r in result.matches]


async def publish(store: BaseDocumentStore, *docs: dict[str, Any], actor: Actor = AUTHOR) -> list[str]:
    answer = await store.publish(provide_bundle(*docs), actor)
    return [doc_id(answer, i) for i in range(1, len(docs) + 1)]


def masked(*codes: str, master: str = "urn:oid:1.2.250.1.999.1.7") -> dict[str, Any]:
    data = f"<ClinicalDocument>{master}</ClinicalDocument>".encode()
    return document(
        master=master, data=data, labels=((CONFIDENTIALITY, "N"), *(visibility(c) for c in codes))
    )


# -- publication ----------------------------------------------------------------------------------


async def test_publish_answers_each_entry_and_stores_the_document(
    documents: BaseDocumentStore, patients: tuple[str, str]
) -> None:
    answer = await documents.publish(provide_bundle(document()), AUTHOR)
    assert answer["type"] == "transaction-response"
    responses = [e["response"] for e in answer["entry"]]
    assert [r["status"] for r in responses] == ["201 Created"] * len(responses)
    assert [r["location"].split("/")[0] for r in responses[:2]] == ["List", "DocumentReference"]
    stored = await documents.read(doc_id(answer), AUTHOR)
    assert stored is not None
    assert (stored["status"], stored["meta"]["versionId"]) == ("current", "1")
    assert stored["subject"] == {"reference": f"Patient/{patients[0]}"}
    assert stored["masterIdentifier"]["value"] == "urn:oid:1.2.250.1.999.1.1"
    assert await documents.read("no-such-document", AUTHOR) is None


async def test_the_bytes_are_retrieved_from_the_documents_binary(
    documents: BaseDocumentStore, patients: tuple[str, str]
) -> None:
    (published,) = await publish(documents, document())
    stored = await documents.read(published, AUTHOR)
    assert stored is not None
    attachment = stored["content"][0]["attachment"]
    assert "data" not in attachment and attachment["url"].startswith("Binary/")
    binary = attachment["url"].split("/")[1]
    got = await documents.retrieve(binary, AUTHOR)
    assert got is not None and (got.data, got.content_type) == (CDA, "application/xml")
    assert await documents.retrieve("no-such-binary", AUTHOR) is None
    assert await documents.retrieve(binary, OTHER_PATIENT) is None


async def test_publish_document_makes_its_own_submission_set(
    documents: BaseDocumentStore, patients: tuple[str, str]
) -> None:
    stored, warnings = await documents.publish_document(document(), AUTHOR)
    assert warnings == []
    assert (stored["status"], stored["subject"]) == ("current", {"reference": f"Patient/{patients[0]}"})
    assert await documents.read(stored["id"], AUTHOR) == stored
    (submission,) = (await documents.search_lists([MINE], AUTHOR)).matches
    assert submission["entry"] == [{"item": {"reference": f"DocumentReference/{stored['id']}"}}]
    with pytest.raises(BadRequest):
        await documents.publish_document(patient_resource(), AUTHOR)


async def test_a_bad_entry_publishes_nothing(documents: BaseDocumentStore, patients: tuple[str, str]) -> None:
    good = document()
    bad = document(master="urn:oid:1.2.250.1.999.1.2", hash_="AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    with pytest.raises(PasserelleError) as info:
        await documents.publish(provide_bundle(good, bad), AUTHOR)
    assert info.value.location is not None and info.value.location.startswith("Bundle.entry[2]")
    assert (await documents.search([MINE, CURRENT], AUTHOR)).total == 0
    assert (await documents.search_lists([MINE], AUTHOR)).total == 0
    with pytest.raises(PasserelleError):
        await documents.publish({"resourceType": "Bundle", "type": "batch", "entry": []}, AUTHOR)


# -- search ---------------------------------------------------------------------------------------


async def test_search_by_patient_and_document_metadata_with_paging(
    documents: BaseDocumentStore, patients: tuple[str, str]
) -> None:
    newer, older = await publish(
        documents,
        document(date="2024-05-14T10:00:00+02:00"),
        document(
            master="urn:oid:1.2.250.1.999.1.2",
            data=b"<ClinicalDocument>B</ClinicalDocument>",
            type_code="11502-2",
            date="2023-01-02T08:00:00+01:00",
        ),
    )

    async def search(*params: tuple[str, str], actor: Actor = AUTHOR) -> list[str]:
        return found(await documents.search([MINE, *params], actor))

    assert sorted(await search(CURRENT)) == sorted([newer, older])
    assert await search(CURRENT, ("patient", patients[0]), ("type", "http://loinc.org|11502-2")) == [older]
    assert await search(CURRENT, ("date", "ge2024-01-01")) == [newer]
    assert await search(("status", "superseded")) == []
    assert found(await documents.search([("patient", patients[1]), CURRENT], AUTHOR)) == []
    first = await documents.search([MINE, CURRENT, ("_count", "1")], AUTHOR)
    second = await documents.search([MINE, CURRENT, ("_count", "1"), ("_offset", "1")], AUTHOR)
    assert (first.total, second.total, len(first.matches), len(second.matches)) == (2, 2, 1, 1)
    assert {*found(first), *found(second)} == {newer, older}
    with pytest.raises(BadRequest):
        await documents.search([MINE, CURRENT, ("no-such-parameter", "x")], AUTHOR)


async def test_search_lists_finds_the_submission_sets_of_a_patient(
    documents: BaseDocumentStore, patients: tuple[str, str]
) -> None:
    (published,) = await publish(documents, document())
    result = await documents.search_lists([("patient", patients[0]), ("code", "submissionset")], AUTHOR)
    (submission,) = result.matches
    assert result.total == 1
    assert submission["entry"] == [{"item": {"reference": f"DocumentReference/{published}"}}]
    assert (await documents.search_lists([("patient", patients[1])], AUTHOR)).total == 0
    with pytest.raises(BadRequest):
        await documents.search_lists([("code", "submissionset")], AUTHOR)


# -- replacement, versions, updates ---------------------------------------------------------------


async def test_a_replacement_supersedes_the_replaced_document(
    documents: BaseDocumentStore, patients: tuple[str, str]
) -> None:
    (first,) = await publish(documents, document())
    replacement = document(
        master="urn:oid:1.2.250.1.999.1.2",
        data=b"<ClinicalDocument>v2</ClinicalDocument>",
        relatesTo=[{"code": "replaces", "target": {"reference": f"DocumentReference/{first}"}}],
    )
    (second,) = await publish(documents, replacement)
    old = await documents.read(first, AUTHOR)
    assert old is not None and (old["status"], old["meta"]["versionId"]) == ("superseded", "2")
    assert found(await documents.search([MINE, ("status", "current")], AUTHOR)) == [second]
    assert found(await documents.search([MINE, ("status", "superseded")], AUTHOR)) == [first]
    versions = await documents.versions("DocumentReference", first)
    assert [(v.version, (v.body or {}).get("status")) for v in versions] == [
        (2, "superseded"),
        (1, "current"),
    ]


async def test_the_author_updates_metadata_and_another_professional_may_not(
    documents: BaseDocumentStore, patients: tuple[str, str]
) -> None:
    (published,) = await publish(documents, document())
    archive = [{"op": "add", "path": "/extension", "value": [{"url": IS_ARCHIVED, "valueBoolean": True}]}]
    with pytest.raises(Forbidden):
        await documents.patch(published, archive, OTHER_PRO)
    unchanged = await documents.read(published, AUTHOR)
    assert unchanged is not None and unchanged["meta"]["versionId"] == "1"
    changed = await documents.patch(published, archive, AUTHOR)
    assert changed["meta"]["versionId"] == "2" and changed["extension"][0]["valueBoolean"] is True
    assert found(await documents.search([MINE, CURRENT, ("isArchived", "true")], AUTHOR)) == [published]
    by_identifier = await documents.patch(
        "?identifier=urn:ietf:rfc:3986|urn:oid:1.2.250.1.999.1.1",
        [{"op": "replace", "path": "/extension/0/valueBoolean", "value": False}],
        AUTHOR,
    )
    assert (by_identifier["id"], by_identifier["meta"]["versionId"]) == (published, "3")
    with pytest.raises(NotFound):
        await documents.patch("no-such-document", archive, AUTHOR)


async def test_delete_is_the_authors_and_marks_the_document_entered_in_error(
    documents: BaseDocumentStore, patients: tuple[str, str]
) -> None:
    mine, other = await publish(documents, document(), masked(master="urn:oid:1.2.250.1.999.1.3"))
    with pytest.raises(Forbidden):
        await documents.delete(mine, OTHER_PRO)
    deleted = await documents.delete(mine, AUTHOR)
    assert (deleted["id"], deleted["status"], deleted["meta"]["versionId"]) == (mine, "entered-in-error", "2")
    assert found(await documents.search([MINE, ("status", "current")], AUTHOR)) == [other]
    assert (await documents.delete(other, ADMIN))["status"] == "entered-in-error"
    with pytest.raises(NotFound):
        await documents.delete("no-such-document", AUTHOR)


# -- who sees what --------------------------------------------------------------------------------


async def test_a_document_masked_from_professionals_is_seen_by_its_author_only(
    documents: BaseDocumentStore, patients: tuple[str, str]
) -> None:
    (hidden,) = await publish(documents, masked("MASQUE_PS"))
    assert await documents.read(hidden, OTHER_PRO) is None
    assert found(await documents.search([MINE, CURRENT], OTHER_PRO)) == []
    assert (await documents.read(hidden, AUTHOR) or {}).get("id") == hidden
    assert found(await documents.search([MINE, CURRENT], AUTHOR)) == [hidden]
    assert (await documents.read(hidden, PATIENT) or {}).get("id") == hidden
    assert (await documents.read(hidden, ADMIN) or {}).get("id") == hidden


async def test_a_patient_sees_their_own_record_only(
    documents: BaseDocumentStore, patients: tuple[str, str]
) -> None:
    shown, invisible = await publish(
        documents, document(), masked("INVISIBLE_PATIENT", master="urn:oid:1.2.250.1.999.1.4")
    )
    assert found(await documents.search([MINE, CURRENT], PATIENT)) == [shown]
    assert await documents.read(invisible, PATIENT) is None
    assert await documents.read(shown, OTHER_PATIENT) is None
    with pytest.raises(Forbidden):
        await documents.search([MINE, CURRENT], OTHER_PATIENT)
    with pytest.raises(Forbidden):
        await documents.search_lists([MINE], OTHER_PATIENT)
    assert sorted(found(await documents.search([MINE, CURRENT], AUTHOR))) == sorted([shown, invisible])
