"""Metadata checks against the shipped value sets: warnings in pdsm mode, 422 in dmp mode."""

from __future__ import annotations

import pytest

from gateway.core.errors import ConfigError
from gateway.store.documents import DEFAULT_VALUESETS, J02, J04, J06, J07, J08, J10, ValueSets
from tests.documents.conftest import SNOMED, Client, document, provide_bundle, publish


def _snomed_context() -> dict[str, object]:
    # As the ANS examples send them: SNOMED CT facility type and practice setting.
    return {
        "period": {"start": "2024-05-14T09:00:00+02:00"},
        "facilityType": {"coding": [{"system": SNOMED, "code": "22232009"}]},
        "practiceSetting": {"coding": [{"system": SNOMED, "code": "394802001"}]},
    }


async def test_pdsm_mode_accepts_other_codes_with_warnings(client: Client) -> None:
    status, answer = await publish(client, provide_bundle(document(context=_snomed_context())))
    assert status == 200, answer
    issues = answer["entry"][1]["response"]["outcome"]["issue"]
    assert {i["severity"] for i in issues} == {"warning"}
    assert sorted(i["expression"][0] for i in issues) == [
        "Bundle.entry[1].resource.context.facilityType",
        "Bundle.entry[1].resource.context.practiceSetting",
    ]
    assert "JDV-J02" in issues[0]["diagnostics"] or "JDV-J04" in issues[0]["diagnostics"]


async def test_pdsm_mode_conforming_document_has_no_warning(client: Client) -> None:
    status, answer = await publish(client, provide_bundle(document()))
    assert status == 200
    assert "outcome" not in answer["entry"][1]["response"]


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"context": _snomed_context()}, "context.facilityType"),
        ({"type_code": "99999-9"}, "type"),
        ({"category": "77"}, "category[0]"),
        ({"labels": (("http://example.org/labels", "SECRET"),)}, "securityLabel[0]"),
    ],
)
async def test_dmp_mode_rejects_with_the_element_path(
    dmp_client: Client, change: dict[str, object], path: str
) -> None:
    status, answer = await publish(dmp_client, provide_bundle(document(**change)))  # type: ignore[arg-type]
    assert status == 422
    assert answer["issue"][0]["expression"] == [f"Bundle.entry[1].resource.{path}"]


async def test_dmp_mode_format_and_required_elements(dmp_client: Client) -> None:
    doc = document()
    doc["content"][0]["format"] = {"system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode",
                                   "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient"}  # fmt: skip
    status, answer = await publish(dmp_client, provide_bundle(doc))
    assert status == 422
    assert answer["issue"][0]["expression"] == ["Bundle.entry[1].resource.content[0].format"]
    doc = document()
    del doc["content"][0]["attachment"]["hash"]
    status, answer = await publish(dmp_client, provide_bundle(doc))
    assert status == 422
    assert answer["issue"][0]["expression"] == ["Bundle.entry[1].resource.content[0].attachment.hash"]
    doc = document()
    del doc["author"]
    status, answer = await publish(dmp_client, provide_bundle(doc))
    assert status == 422
    status, answer = await publish(dmp_client, provide_bundle(document()))
    assert status == 200, answer


def test_shipped_value_sets_load() -> None:
    sets = ValueSets.load(DEFAULT_VALUESETS)
    loinc = "http://loinc.org"
    assert sets.contains(J07, loinc, "11488-4") and not sets.contains(J07, loinc, "99999-9")
    for valueset in (J02, J04, J06, J07, J08, J10):
        assert sets.sets[valueset]


def test_missing_value_sets_are_a_config_error(tmp_path: object) -> None:
    from pathlib import Path

    with pytest.raises(ConfigError):
        ValueSets.load(Path(str(tmp_path)))
