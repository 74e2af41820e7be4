"""The merge write policy: ``merge_resource`` rule by rule and as a property, then through a
repository's transactions (collected again by tests/scale/test_pg_fhir.py for PostgreSQL)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.errors import BadRequest
from gateway.mapping.validate import bundle_errors
from gateway.store.fhir_common import FhirRepository
from gateway.store.merge import (
    CLEAR_URL,
    IF_ABSENT_URL,
    WRITE_POLICY_URL,
    Policy,
    merge_resource,
    strip_policy,
    write_policy,
)
from tests.fhir.conftest import INS, IPP

OTHER_IPP = "urn:oid:1.2.250.1.71.4.2.8"  # another site's patient numbers
BIRTHPLACE = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"
NATIONALITY = "http://hl7.org/fhir/StructureDefinition/patient-nationality"
FR_PATIENT = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient"


def ident(system: str | None, value: str, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"value": value, **extra}
    if system is not None:
        out["system"] = system
    return out


def stored_patient() -> dict[str, Any]:
    """What an A01 left: IPP, INS, address, birth date and place, a profile; server meta."""
    return {
        "resourceType": "Patient",
        "id": "p1",
        "meta": {
            "versionId": "4",
            "lastUpdated": "2024-05-14T08:30:00.000000Z",
            "profile": [FR_PATIENT],
            "source": "urn:adt",
        },
        "extension": [
            {"url": BIRTHPLACE, "valueAddress": {"city": "Lyon"}},
            {"url": NATIONALITY, "extension": [{"url": "code", "valueCodeableConcept": {"text": "FR"}}]},
        ],
        "identifier": [ident(IPP, "200001"), ident(INS, "2840775123456")],
        "name": [{"family": "Lefèvre", "given": ["Amélie"]}],
        "telecom": [{"system": "phone", "value": "0102030405"}],
        "gender": "female",
        "birthDate": "1984-07-07",
        "address": [{"city": "Lyon", "postalCode": "69003"}],
    }


# -- merge_resource, rule by rule -----------------------------------------------------------------


def test_merge_keeps_absent_elements_and_replaces_present_ones() -> None:
    thin = {
        "resourceType": "Patient",
        "identifier": [ident(IPP, "200001")],
        "name": [{"family": "Lefèvre-Martin", "given": ["Amélie"]}],
    }
    merged = merge_resource(stored_patient(), thin)
    assert merged["name"] == thin["name"]
    for kept in ("telecom", "gender", "birthDate", "address", "extension"):
        assert merged[kept] == stored_patient()[kept]
    assert merged["identifier"] == [ident(IPP, "200001"), ident(INS, "2840775123456")]


def test_merge_keeps_the_current_id_and_type() -> None:
    merged = merge_resource(stored_patient(), {"resourceType": "Patient", "id": "other", "gender": "male"})
    assert (merged["resourceType"], merged["id"], merged["gender"]) == ("Patient", "p1", "male")
    assert list(merged)[:3] == ["resourceType", "id", "meta"]


def test_identifiers_merge_per_system() -> None:
    current = stored_patient()
    # A47: a new INS of the same system moves the identifier; the IPP stays.
    moved = merge_resource(current, {"resourceType": "Patient", "identifier": [ident(INS, "1920375999001")]})
    assert moved["identifier"] == [ident(INS, "1920375999001"), ident(IPP, "200001")]
    # A new IPP of the same namespace replaces the old one; another site's IPP is added.
    renumbered = merge_resource(
        current, {"resourceType": "Patient", "identifier": [ident(IPP, "200002"), ident(OTHER_IPP, "7")]}
    )
    assert renumbered["identifier"] == [
        ident(IPP, "200002"),
        ident(OTHER_IPP, "7"),
        ident(INS, "2840775123456"),
    ]


def test_identifiers_without_system_stay_unless_an_incoming_one_has_their_value_and_type() -> None:
    mr = {"coding": [{"code": "MR"}]}
    current = {
        "resourceType": "Patient",
        "id": "p",
        "identifier": [ident(None, "42", type=mr), ident(None, "43"), ident(INS, "2840775123456")],
    }
    incoming = {"resourceType": "Patient", "identifier": [ident(IPP, "42", type=mr), ident(None, "44")]}
    merged = merge_resource(current, incoming)
    assert merged["identifier"] == [
        ident(IPP, "42", type=mr),
        ident(None, "44"),
        ident(None, "43"),
        ident(INS, "2840775123456"),
    ]


def test_extensions_merge_per_url() -> None:
    incoming = {
        "resourceType": "Patient",
        "extension": [{"url": BIRTHPLACE, "valueAddress": {"city": "Nice"}}],
    }
    merged = merge_resource(stored_patient(), incoming)
    assert merged["extension"] == [
        {"url": BIRTHPLACE, "valueAddress": {"city": "Nice"}},
        stored_patient()["extension"][1],
    ]


def test_links_merge_per_other_reference() -> None:
    current = {
        "resourceType": "Patient",
        "id": "p",
        "link": [
            {"other": {"reference": "Patient/a"}, "type": "seealso"},
            {"other": {"reference": "Patient/b"}, "type": "seealso"},
        ],
    }
    incoming = {
        "resourceType": "Patient",
        "link": [
            {"other": {"reference": "Patient/b"}, "type": "replaces"},
            {"other": {"reference": "Patient/c"}, "type": "replaces"},
        ],
    }
    assert merge_resource(current, incoming)["link"] == [
        {"other": {"reference": "Patient/b"}, "type": "replaces"},
        {"other": {"reference": "Patient/c"}, "type": "replaces"},
        {"other": {"reference": "Patient/a"}, "type": "seealso"},
    ]


def test_meta_keeps_stored_profiles_then_adds_new_ones() -> None:
    incoming = {"resourceType": "Patient", "meta": {"profile": ["urn:p2", FR_PATIENT], "source": "urn:oru"}}
    assert merge_resource(stored_patient(), incoming)["meta"] == {
        "profile": [FR_PATIENT, "urn:p2"],
        "source": "urn:oru",
    }
    # Without incoming meta, only the stored profiles remain: the server's meta is not content.
    assert merge_resource(stored_patient(), {"resourceType": "Patient"})["meta"] == {"profile": [FR_PATIENT]}
    assert "meta" not in merge_resource({"resourceType": "Patient", "meta": {"versionId": "1"}}, {})


def test_clear_removes_named_elements_the_incoming_lacks() -> None:
    incoming = {"resourceType": "Patient", "address": [{"city": "Nice"}]}
    merged = merge_resource(stored_patient(), incoming, ("telecom", "address", "deceasedBoolean"))
    assert "telecom" not in merged
    assert merged["address"] == [{"city": "Nice"}]  # sent after all: the incoming value wins
    assert merged["birthDate"] == "1984-07-07"


def test_clear_never_removes_what_names_the_resource() -> None:
    merged = merge_resource(stored_patient(), {"resourceType": "Patient"}, ("id", "resourceType", "meta"))
    assert (merged["resourceType"], merged["id"], merged["meta"]) == (
        "Patient",
        "p1",
        {"profile": [FR_PATIENT]},
    )


def test_merge_changes_neither_input_and_shares_nothing_with_them() -> None:
    current, incoming = (
        stored_patient(),
        {
            "resourceType": "Patient",
            "identifier": [ident(IPP, "200001")],
            "address": [{"city": "Nice"}],
        },
    )
    before = copy.deepcopy((current, incoming))
    merged = merge_resource(current, incoming, ("telecom",))
    assert (current, incoming) == before
    merged["identifier"][0]["value"] = "changed"
    merged["address"][0]["city"] = "changed"
    merged["extension"][0]["valueAddress"]["city"] = "changed"
    assert (current, incoming) == before


# -- the request extensions -----------------------------------------------------------------------


def policy_request(*extensions: dict[str, Any]) -> dict[str, Any]:
    return {"method": "PUT", "url": "Patient?identifier=s|v", "extension": list(extensions)}


def test_write_policy_of_a_request() -> None:
    assert write_policy({"method": "PUT", "url": "Patient/p"}) == Policy("replace")
    unknown = {"url": "urn:someone-else", "valueString": "x"}
    assert write_policy(policy_request(unknown)) == Policy("replace")
    request = policy_request(
        {"url": WRITE_POLICY_URL, "valueCode": "merge"},
        unknown,
        {"url": CLEAR_URL, "valueString": "telecom"},
        {"url": CLEAR_URL, "valueString": "address"},
        {"url": IF_ABSENT_URL, "valueString": "status"},
    )
    assert write_policy(request) == Policy("merge", ("telecom", "address"), ("status",))
    assert strip_policy(request) == {"method": "PUT", "url": "Patient?identifier=s|v", "extension": [unknown]}
    assert "extension" not in strip_policy(policy_request({"url": WRITE_POLICY_URL, "valueCode": "merge"}))


@pytest.mark.parametrize(
    "extension",
    [
        "not a list",
        ["not an object"],
        [{"url": WRITE_POLICY_URL, "valueCode": "upsert"}],
        [{"url": WRITE_POLICY_URL}],
        [{"url": WRITE_POLICY_URL, "valueCode": "merge"}, {"url": WRITE_POLICY_URL, "valueCode": "replace"}],
        [{"url": CLEAR_URL, "valueString": ""}],
    ],
)
def test_malformed_write_policy_is_a_bad_request_at_request_extension(extension: Any) -> None:
    with pytest.raises(BadRequest) as info:
        write_policy({"method": "PUT", "url": "Patient/p", "extension": extension})
    assert info.value.location == "request.extension"


# -- merge_resource as a property -------------------------------------------------------------------

SYSTEMS = st.sampled_from([INS, IPP, OTHER_IPP, None])
IDENTIFIERS = st.lists(st.builds(ident, SYSTEMS, st.sampled_from(["1", "2", "3"])), max_size=4)
EXTENSIONS = st.lists(
    st.fixed_dictionaries(
        {
            "url": st.sampled_from([BIRTHPLACE, NATIONALITY, "urn:x"]),
            "valueString": st.sampled_from(["a", "b"]),
        }
    ),
    max_size=3,
)
LINKS = st.lists(
    st.fixed_dictionaries(
        {
            "other": st.fixed_dictionaries({"reference": st.sampled_from(["Patient/a", "Patient/b"])}),
            "type": st.sampled_from(["seealso", "replaces"]),
        }
    ),
    max_size=3,
)
META = st.fixed_dictionaries(
    {},
    optional={
        "profile": st.lists(st.sampled_from([FR_PATIENT, "urn:p2", "urn:p3"]), max_size=2, unique=True),
        "source": st.sampled_from(["urn:adt", "urn:oru"]),
        "versionId": st.sampled_from(["1", "2"]),
    },
)
ELEMENTS = {
    "identifier": IDENTIFIERS,
    "extension": EXTENSIONS,
    "link": LINKS,
    "meta": META,
    "name": st.lists(st.fixed_dictionaries({"family": st.sampled_from(["Roux", "Blanc"])}), max_size=2),
    "telecom": st.lists(st.fixed_dictionaries({"value": st.sampled_from(["01", "02"])}), max_size=2),
    "gender": st.sampled_from(["female", "male", "unknown"]),
    "birthDate": st.sampled_from(["1984-07-07", "1990-01-01"]),
    "address": st.lists(st.fixed_dictionaries({"city": st.sampled_from(["Lyon", "Nice"])}), max_size=2),
    "active": st.booleans(),
}
PATIENTS = st.fixed_dictionaries({"resourceType": st.just("Patient")}, optional=ELEMENTS)
STORED = st.fixed_dictionaries({"resourceType": st.just("Patient"), "id": st.just("p1")}, optional=ELEMENTS)
CLEAR = st.lists(st.sampled_from(sorted(ELEMENTS)), max_size=3)
MERGED_ELEMENTS = ("resourceType", "id", "identifier", "extension", "link", "meta", "participant", "telecom")


@given(STORED, PATIENTS, CLEAR)
def test_merge_properties(current: dict[str, Any], incoming: dict[str, Any], clear: list[str]) -> None:
    before = copy.deepcopy((current, incoming))
    merged = merge_resource(current, incoming, clear)
    assert (current, incoming) == before
    for key, value in incoming.items():
        if key not in MERGED_ELEMENTS:
            assert merged[key] == value
    for key in current:
        if key not in incoming and key not in MERGED_ELEMENTS:
            assert (key in merged) == (key not in clear)
    if "identifier" in incoming:
        # an identifier of a system (and type) the message does not carry is never removed
        systems = {(i.get("system"), str(i.get("type"))) for i in incoming["identifier"]}
        for stored in current.get("identifier", []):
            if (
                stored.get("system") is not None
                and (stored["system"], str(stored.get("type"))) not in systems
            ):
                assert stored in merged["identifier"]
        for new in incoming["identifier"]:
            assert new in merged["identifier"]
    elif "identifier" in current and "identifier" not in clear:
        assert merged["identifier"] == current["identifier"]
    assert merge_resource(merged, incoming, clear) == merged


# -- through a repository's transactions ------------------------------------------------------------

P_URL = f"Patient?identifier={IPP}|200001"


def transaction(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def put(
    url: str, resource: dict[str, Any], *, merge: bool = True, clear: tuple[str, ...] = (), full_url: str = ""
) -> dict[str, Any]:
    request: dict[str, Any] = {"method": "PUT", "url": url}
    extensions = [{"url": WRITE_POLICY_URL, "valueCode": "merge"}] if merge else []
    extensions += [{"url": CLEAR_URL, "valueString": name} for name in clear]
    if extensions:
        request["extension"] = extensions
    entry: dict[str, Any] = {"resource": resource, "request": request}
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def admitted() -> dict[str, Any]:
    """An A01's Patient: IPP, INS, address, birth date, phone."""
    return {
        "resourceType": "Patient",
        "identifier": [ident(IPP, "200001"), ident(INS, "2840775123456")],
        "name": [{"family": "Lefèvre", "given": ["Amélie"]}],
        "telecom": [{"system": "phone", "value": "0102030405"}],
        "gender": "female",
        "birthDate": "1984-07-07",
        "address": [{"city": "Lyon", "postalCode": "69003"}],
    }


def thin(family: str = "Lefèvre-Martin") -> dict[str, Any]:
    """An ORU's Patient: the IPP and a name, nothing else."""
    return {"resourceType": "Patient", "identifier": [ident(IPP, "200001")], "name": [{"family": family}]}


async def the_patient(repo: FhirRepository) -> dict[str, Any]:
    found = await repo.search("Patient", [("identifier", f"{IPP}|200001")])
    assert found.total == 1
    return found.matches[0]


async def test_thin_merge_keeps_what_the_owner_set(repo: FhirRepository) -> None:
    await repo.transaction(transaction(put(P_URL, admitted(), merge=False)))
    answer = await repo.transaction(transaction(put(P_URL, thin())))
    assert answer["entry"][0]["response"]["status"] == "200 OK"
    stored = await the_patient(repo)
    assert stored["meta"]["versionId"] == "2"
    assert stored["name"] == [{"family": "Lefèvre-Martin"}]
    assert stored["identifier"] == [ident(IPP, "200001"), ident(INS, "2840775123456")]
    for kept in ("telecom", "gender", "birthDate", "address"):
        assert stored[kept] == admitted()[kept]
    # Still found by the INS the thin message did not carry.
    assert (await repo.search("Patient", [("identifier", f"{INS}|2840775123456")])).total == 1


async def test_replayed_merge_writes_no_new_version(repo: FhirRepository) -> None:
    await repo.transaction(transaction(put(P_URL, admitted(), merge=False)))
    first = await repo.transaction(transaction(put(P_URL, thin())))
    again = await repo.transaction(transaction(put(P_URL, thin())))
    assert again["entry"][0]["response"] == first["entry"][0]["response"]
    stored = await the_patient(repo)
    assert stored["meta"]["versionId"] == "2" and stored["birthDate"] == "1984-07-07"
    # A full message equal to what is stored changes nothing either.
    await repo.transaction(transaction(put(P_URL, admitted(), merge=False)))
    await repo.transaction(transaction(put(P_URL, admitted())))
    assert (await the_patient(repo))["meta"]["versionId"] == "3"


async def test_merge_clear_removes_an_element(repo: FhirRepository) -> None:
    await repo.transaction(transaction(put(P_URL, admitted(), merge=False)))
    await repo.transaction(transaction(put(P_URL, thin(), clear=("telecom",))))
    stored = await the_patient(repo)
    assert "telecom" not in stored
    assert stored["address"] == admitted()["address"]


async def test_merge_matching_nothing_creates_the_resource(repo: FhirRepository) -> None:
    answer = await repo.transaction(transaction(put(P_URL, thin(), clear=("telecom",))))
    assert answer["entry"][0]["response"]["status"] == "201 Created"
    stored = await the_patient(repo)
    assert {k: v for k, v in stored.items() if k not in ("id", "meta")} == thin()


async def test_merge_by_id_and_after_a_deletion(repo: FhirRepository) -> None:
    await repo.update("Patient", "p1", admitted())
    await repo.transaction(transaction(put("Patient/p1", thin())))
    stored = await repo.read("Patient", "p1")
    assert stored is not None and stored["birthDate"] == "1984-07-07"
    assert await repo.delete("Patient", "p1")
    await repo.transaction(transaction(put("Patient/p1", thin())))
    recreated = await repo.read("Patient", "p1")
    assert recreated is not None and "birthDate" not in recreated  # nothing left to merge into


async def test_plain_put_still_replaces(repo: FhirRepository) -> None:
    await repo.transaction(transaction(put(P_URL, admitted(), merge=False)))
    await repo.transaction(transaction(put(P_URL, thin(), merge=False)))
    stored = await the_patient(repo)
    assert "birthDate" not in stored and stored["identifier"] == [ident(IPP, "200001")]


async def test_merge_sees_references_resolved_and_earlier_entries_written(repo: FhirRepository) -> None:
    await repo.transaction(transaction(put(P_URL, admitted(), merge=False)))
    other = {"resourceType": "Patient", "identifier": [ident(IPP, "200009")]}
    linked = {**thin(), "link": [{"other": {"reference": "urn:uuid:other"}, "type": "seealso"}]}
    phone = {"resourceType": "Patient", "telecom": [{"system": "phone", "value": "0600000000"}]}
    await repo.transaction(
        transaction(
            put(f"Patient?identifier={IPP}|200009", other, merge=False, full_url="urn:uuid:other"),
            put(P_URL, linked),
            put(P_URL, phone),  # the same Patient again: merged into what the entry before wrote
        )
    )
    other_id = (await repo.search("Patient", [("identifier", f"{IPP}|200009")])).matches[0]["id"]
    stored = await the_patient(repo)
    assert stored["link"] == [{"other": {"reference": f"Patient/{other_id}"}, "type": "seealso"}]
    assert stored["name"] == [{"family": "Lefèvre-Martin"}]
    assert stored["telecom"] == phone["telecom"]
    assert stored["birthDate"] == "1984-07-07"


async def test_unknown_write_policy_is_refused_naming_request_extension(repo: FhirRepository) -> None:
    entry = put(P_URL, thin())
    entry["request"]["extension"][0]["valueCode"] = "upsert"
    with pytest.raises(BadRequest) as info:
        await repo.transaction(transaction(entry))
    assert info.value.location == "Bundle.entry[0].request.extension"
    ignored = put(P_URL, thin(), merge=False)
    ignored["request"]["extension"] = [{"url": "urn:someone-else", "valueCode": "upsert"}]
    answer = await repo.transaction(transaction(ignored))
    assert answer["entry"][0]["response"]["status"] == "201 Created"


def test_a_choice_sent_as_another_type_replaces_the_stored_one() -> None:
    """Both alternatives of a choice in one resource is invalid FHIR: the message's wins."""
    stored = {"resourceType": "Patient", "id": "p", "deceasedBoolean": False, "_deceasedBoolean": {"id": "x"}}
    merged = merge_resource(stored, {"resourceType": "Patient", "deceasedDateTime": "2026-11-01"})
    assert merged == {"resourceType": "Patient", "id": "p", "deceasedDateTime": "2026-11-01"}
    assert bundle_errors({"entry": [{"resource": merged}]}) == []
