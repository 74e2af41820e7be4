"""PPR^PC1/PC2 (problems) → Condition (problem-list-item) and Goal; REF^I12/I13/I14 (referrals) →
ServiceRequest with its referring and referred-to providers. Golden cases written from HL7 v2.5
chapters 12 (PRB, GOL) and 11 (RF1, PRD) and the FHIR R4 resources' v2 mappings, with fictional
French identities (RPPS numbers of the test range)."""

from __future__ import annotations

import pytest

from tests.mapping.checked_conversion import PID, SENDER_SYSTEM, convert, key, message, of_type, segment

PROBLEM_OID = "1.2.250.1.71.4.2.2.7705"


def prb(status: str = "active", **more: str) -> str:
    fields = {
        1: "AD",
        2: "20270315093000",
        3: "I10^Hypertension essentielle^I10",
        4: f"PB-31^DPI^{PROBLEM_OID}^ISO",
        9: "",
        14: status,
        16: "20250601",
    }
    return segment("PRB", {**fields, **{int(k[1:]): v for k, v in more.items()}})


def test_pc1_a_problem_list_item() -> None:
    note = "NTE|1||Suivi tensionnel mensuel"
    result = convert(message("PPR^PC1^PPR_PC1", PID, prb(), note))
    (problem,) = of_type(result, "Condition")
    assert problem["request"] == {
        "method": "PUT",
        "url": f"Condition?identifier=urn:oid:{PROBLEM_OID}|PB-31",
    }  # replace: the problem as its feed states it
    condition = problem["resource"]
    assert condition["category"] == [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                    "code": "problem-list-item",
                    "display": "Problem List Item",
                }
            ]
        }
    ]
    assert condition["clinicalStatus"] == {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
    }
    assert condition["code"]["coding"] == [
        {"system": "http://hl7.org/fhir/sid/icd-10", "code": "I10", "display": "Hypertension essentielle"}
    ]
    assert condition["onsetDateTime"] == "2025-06-01"
    assert condition["subject"] == {"reference": "urn:uuid:0"}
    assert condition["note"] == [{"text": "Suivi tensionnel mensuel"}]
    # the action and its time are an instruction to the receiver, not the problem: reported
    assert {"PRB-1[1]", "PRB-2[1]"} <= set(result.unmapped)


def test_pc2_resolved_in_upper_case() -> None:
    result = convert(message("PPR^PC2^PPR_PC1", PID, prb("RESOLVED", p9="20270301")))
    condition = of_type(result, "Condition")[0]["resource"]
    assert condition["clinicalStatus"]["coding"][0]["code"] == "resolved"
    assert condition["abatementDateTime"] == "2027-03-01"


def test_a_local_life_cycle_code_is_reported_never_guessed() -> None:
    result = convert(message("PPR^PC1^PPR_PC1", PID, prb("EN_COURS")))
    condition = of_type(result, "Condition")[0]["resource"]
    assert "clinicalStatus" not in condition
    assert "PRB-14[1]" in result.unmapped
    assert any("prb-14-condition-clinical" in w for w in result.warnings)
    assert any("con-3" in w for w in result.warnings)


def test_a_goal_addresses_its_problem_when_its_status_is_known() -> None:
    goal = segment(
        "GOL",
        {
            1: "AD",
            2: "20270315093000",
            3: "TA-CIBLE^Tension < 140/90^L",
            4: f"OBJ-5^DPI^{PROBLEM_OID}^ISO",
            18: "active",
        },
    )
    unknown = goal.replace("OBJ-5", "OBJ-6").replace("|active", "|EN_COURS")
    result = convert(message("PPR^PC1^PPR_PC1", PID, prb(), goal, unknown))
    (written,) = of_type(result, "Goal")  # a lifecycle status R4 requires: only the first has one
    assert key(written) == f"identifier=urn:oid:{PROBLEM_OID}|OBJ-5"
    assert written["resource"]["lifecycleStatus"] == "active"
    assert written["resource"]["description"]["text"] == "Tension < 140/90"
    assert written["resource"]["addresses"] == [{"reference": of_type(result, "Condition")[0]["fullUrl"]}]
    assert "GOL[2]-4[1].1" in result.unmapped


def test_pc3_problem_delete_is_refused_with_its_reason() -> None:
    from gateway.core.errors import UnsupportedMessage

    with pytest.raises(UnsupportedMessage, match="problem deletion"):
        convert(message("PPR^PC3^PPR_PC1", PID, prb()))


RF1 = segment(
    "RF1",
    {
        1: "P^En attente^HL70283",
        2: "A^ASAP^HL70280",
        3: "Med^Médical^HL70281",
        5: "O^Externe^HL70284",
        6: "ADR-2027-0042^DPI^1.2.250.1.71.4.2.2.7706^ISO",
        7: "20270315",
        10: "R51^Céphalées^I10",
    },
)
RPPS_OID = "1.2.250.1.71.4.2.1"
REFERRER = segment(
    "PRD",
    {
        1: "RP^Médecin adresseur^HL70286",
        2: "MOREAU^Julien^^^Dr",
        5: "^WPN^PH^^^^^^^^^0383000000",
        7: "10303030303^RPPS",
    },
)
REFERRED = segment(
    "PRD",
    {1: "RT^Médecin destinataire^HL70286", 2: "FONTAINE^Inès^^^Dr", 7: "810404040404^IDNPS"},
)


@pytest.mark.parametrize(("trigger", "status"), [("I12", "active"), ("I13", "active"), ("I14", "revoked")])
def test_a_referral(trigger: str, status: str) -> None:
    result = convert(message(f"REF^{trigger}^REF_I12", RF1, REFERRER, REFERRED, PID))
    (referral,) = of_type(result, "ServiceRequest")
    assert key(referral).startswith("identifier=urn:oid:1.2.250.1.71.4.2.2.7706|ADR-2027-0042")
    request = referral["resource"]
    assert request["status"] == status
    assert request["intent"] == "order"
    assert request["priority"] == "asap"
    assert request["authoredOn"] == "2027-03-15"
    assert request["reasonCode"][0]["coding"][0] == {
        "system": "http://hl7.org/fhir/sid/icd-10",
        "code": "R51",
        "display": "Céphalées",
    }
    referrer, referred = of_type(result, "Practitioner")
    assert request["requester"] == {"reference": referrer["fullUrl"]}
    assert request["performer"] == [{"reference": referred["fullUrl"]}]
    # national numbers as the FR Core slices: RPPS and its IDNPS (8 + RPPS), an IDNPS that holds one
    assert [(i["system"], i["value"]) for i in referrer["resource"]["identifier"]] == [
        ("https://rpps.esante.gouv.fr", "10303030303"),
        (f"urn:oid:{RPPS_OID}", "810303030303"),
    ]
    assert [(i["system"], i["value"]) for i in referred["resource"]["identifier"]] == [
        ("https://rpps.esante.gouv.fr", "10404040404"),
        (f"urn:oid:{RPPS_OID}", "810404040404"),
    ]
    assert referrer["resource"]["name"] == [{"family": "MOREAU", "given": ["Julien"], "prefix": ["Dr"]}]
    # the referred-to provider's acceptance (RF1-1) has no place in R4's request status: reported
    assert "RF1-1[1].1" in result.unmapped


def test_a_provider_without_a_number_makes_no_resource() -> None:
    anonymous = REFERRED.replace("|810404040404^IDNPS", "")
    result = convert(message("REF^I12^REF_I12", RF1, REFERRER, anonymous, PID))
    assert len(of_type(result, "Practitioner")) == 1
    assert "performer" not in of_type(result, "ServiceRequest")[0]["resource"]


def test_a_local_provider_number_is_namespaced_by_its_type() -> None:
    local = REFERRER.replace("10303030303^RPPS", "A-77^SL^^20281231")
    result = convert(message("REF^I12^REF_I12", RF1, local, PID))
    (practitioner,) = of_type(result, "Practitioner")
    assert practitioner["resource"]["identifier"] == [
        {"system": f"{SENDER_SYSTEM}/practitioner/SL", "value": "A-77", "period": {"end": "2028-12-31"}}
    ]
