"""Reverse mappings, golden: authored French FHIR in, the full ER7 message out, compared whole."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.core.errors import ConfigError, EncodingError, UnsupportedMessage, ValidationError
from gateway.hl7.er7 import Message
from gateway.mapping import reverse_functions
from gateway.mapping.reverse import ReverseLibrary, ReverseResult
from tests.reverse import fhir_data as d

ROOT = Path(__file__).resolve().parents[2]
LIB = ReverseLibrary.load(ROOT / "mappings" / "reverse", reverse_functions.available())
NOW = datetime(2026, 11, 25, 15, 0, tzinfo=UTC)  # 16:00 in Paris
HEADER = {"sending_application": "PASSERELLE", "receiving_application": "SIH", "receiving_facility": "CHU"}

PAM = "P|2.5^FRA^2.11|||||FRA|UNICODE UTF-8|||2.11^IHE_FRANCE-2.11-PAM"
PID = (
    "PID|1||100001^^^&1.2.250.1.71.4.2.2.1234&ISO^PI~275041225012345^^^ASIP-SANTE-INS-NIR"
    "&1.2.250.1.213.1.4.8&ISO^INS||LEFÈVRE^Françoise^^^^^L~D'ARCY\\S\\MARTIN^Françoise^^^^^D||19750412|F|||"
    "12 rue des Écoles^^Besançon^^25000^FRA~^^Besançon^^^FRA^BDL^^25056||0381000000" + "|" * 19 + "VALI"
)
PV1_VISIT = "PV1|1|I|CARDIO" + "|" * 16 + "V2026000123^^^&1.2.250.1.71.4.2.2.1234&ISO^VN" + "|" * 25


def er7(result: ReverseResult) -> list[str]:
    return [m.to_er7() for m in result.messages]


def lines(*segments: str) -> str:
    return "\r".join(segments) + "\r"


def run(data: dict[str, object], **kw: object) -> ReverseResult:
    return LIB.map(data, header=HEADER, control_id="CID0001", now=NOW, **kw)  # type: ignore[arg-type]


def msh(event: str, version: str = PAM) -> str:
    return f"MSH|^~\\&|PASSERELLE||SIH|CHU|20261125160000||{event}|CID0001|{version}"


def test_new_patient_is_a28_with_ins_birthplace_and_name_types() -> None:
    result = run(d.patient())
    assert result.mappings == ["pam-fr-patient-out"]
    assert result.warnings == []
    assert er7(result) == [lines(msh("ADT^A28^ADT_A05"), "EVN||20261125160000", PID, "PV1|1|N")]


def test_update_is_a31_and_the_ins_without_vali_is_left_out_with_a_warning() -> None:
    result = run(d.patient("PROV"), interaction="update")
    pid = PID.replace("~275041225012345^^^ASIP-SANTE-INS-NIR&1.2.250.1.213.1.4.8&ISO^INS", "")
    assert er7(result) == [
        lines(msh("ADT^A31^ADT_A05"), "EVN||20261125160000", pid.replace("VALI", "PROV"), "PV1|1|N")
    ]
    assert result.warnings == ["INS without identity status VALI: left out of PID-3 (PAM FR rule)"]


def test_bundle_entry_method_says_create_or_update() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"resource": d.patient(), "request": {"method": "PUT", "url": "Patient?identifier=x|1"}}],
    }
    assert run(bundle).messages[0].trigger == "A31"


def test_admission_is_a01_with_pv1_and_zbe() -> None:
    result = run(d.encounter_bundle())
    assert er7(result) == [
        lines(
            msh("ADT^A01^ADT_A01"),
            "EVN||20261125160000||||20261123101500",
            PID,
            PV1_VISIT + "20261123101500",
            "ZBE|V2026000123^^1.2.250.1.71.4.2.2.1234^ISO|20261123101500||INSERT|N||Cardiologie^^^^^^^^^4012",
        )
    ]


def test_discharge_is_a03_dated_by_the_end() -> None:
    result = run(d.encounter_bundle("finished", end="2026-11-26T11:00:00+01:00"))
    assert er7(result) == [
        lines(
            msh("ADT^A03^ADT_A03"),
            "EVN||20261125160000||||20261126110000",
            PID,
            PV1_VISIT + "20261123101500|20261126110000",
            "ZBE|V2026000123^^1.2.250.1.71.4.2.2.1234^ISO|20261126110000||INSERT|N||Cardiologie^^^^^^^^^4012",
        )
    ]


def test_movement_partof_its_visit_later_is_a_transfer() -> None:
    bundle = d.encounter_bundle()
    movement = {
        "resourceType": "Encounter",
        "status": "in-progress",
        "class": {"code": "IMP"},
        "identifier": [{"system": "urn:oid:1.2.250.1.71.4.2.2.1234", "value": "MVT-7"}],
        "subject": {"reference": "urn:uuid:pat"},
        "partOf": {"reference": "urn:uuid:enc"},
        "period": {"start": "2026-11-24T09:00:00+01:00"},
        "location": [{"location": {"display": "REA"}}],
    }
    bundle["entry"].append({"fullUrl": "urn:uuid:mvt", "resource": movement})  # type: ignore[attr-defined]
    result = run(bundle)
    assert len(result.messages) == 1  # the visit is part of the movement's message, not one of its own
    msg = result.messages[0]
    assert msg.get("MSH-9.2") == "A02" and msg.get("MSH-9.3") == "ADT_A02"
    assert msg.get("PV1-3.1") == "REA"
    assert msg.get("PV1-19.1") == "V2026000123"
    assert msg.get("ZBE-1.1") == "MVT-7"
    assert msg.get("ZBE-2") == "20261124090000"


@pytest.mark.parametrize(
    ("history", "locations", "trigger", "original"),
    [
        ([], 1, "A11", "A01"),
        ([{"status": "finished", "period": {"start": "2026-11-26T11:00:00+01:00"}}], 1, "A13", "A03"),
        ([], 2, "A12", "A02"),
    ],
)
def test_entered_in_error_sends_the_matching_cancel(
    history: list[object], locations: int, trigger: str, original: str
) -> None:
    bundle = d.encounter_bundle("entered-in-error")
    encounter = bundle["entry"][1]["resource"]  # type: ignore[index]
    encounter["statusHistory"] = history
    encounter["location"] = [{"location": {"display": f"LIT-{n}"}} for n in range(locations)]
    msg = run(bundle).messages[0]
    assert msg.trigger == trigger
    assert msg.get("ZBE-4") == "CANCEL"
    assert msg.get("ZBE-6") == original


def test_report_is_oru_with_obr_obx_value_types_and_ucum() -> None:
    result = run(d.report_bundle())
    assert er7(result) == [
        lines(
            msh("ORU^R01^ORU_R01", "P|2.5|||||FRA|UNICODE UTF-8"),
            PID,
            "OBR|1||CMD-42^^1.2.250.1.71.4.2.2.4455^ISO|24331-1^Bilan lipidique^LN|||20261123080000"
            + "|" * 15
            + "20261123103000|||F",
            "OBX|1|NM|2093-3^Cholestérol total^LN||5.2|mmol/L^^UCUM|3.5-6.5|N|||F|||20261123080000",
            "OBX|2|TX|^Commentaire||Prélèvement hémolysé \\F\\ à refaire~Contrôle demandé||||||F",
        )
    ]


def test_device_observations_are_one_oru_blood_pressure_by_components() -> None:
    result = run(d.device_bundle())
    assert result.warnings == []
    ts = "|||||F|||20261124073000||||TENSIO-42"
    assert er7(result) == [
        lines(
            msh("ORU^R01^ORU_R01", "P|2.5|||||FRA|UNICODE UTF-8"),
            PID,
            "OBR|1||CID0001|8867-4^Fréquence cardiaque^LN|||20261124073000" + "|" * 18 + "F",
            "OBX|1|NM|8867-4^Fréquence cardiaque^LN||72|/min^battements/min^UCUM" + ts,
            "OBX|2|NM|59408-5^SpO2^LN||97|%^^UCUM" + ts,
            "OBX|3|NM|29463-7^Poids^LN||71.5|kg^^UCUM" + ts,
            "OBX|4|NM|8480-6^Systolique^LN||128|mm[Hg]^mmHg^UCUM" + ts,
            "OBX|5|NM|8462-4^Diastolique^LN||82|mm[Hg]^mmHg^UCUM" + ts,
            "OBX|6|NM|2339-0^Glycémie^LN||1.05|g/L^^UCUM" + ts,
        )
    ]


def test_single_observation_without_its_patient_is_refused() -> None:
    obs = d.device_bundle()["entry"][1]["resource"]  # type: ignore[index]
    obs["subject"] = {"reference": "Patient/elsewhere"}
    with pytest.raises(ValidationError, match="Patient"):
        run(obs)


def test_logical_reference_gives_pid3_from_its_identifier() -> None:
    obs = copy.deepcopy(d.device_bundle()["entry"][1]["resource"])  # type: ignore[index]
    obs["subject"] = {"identifier": {"system": d.IPP_SYSTEM, "value": "100001"}, "type": "Patient"}
    msg = run(obs).messages[0]
    assert msg.get_raw("PID-3") == "100001^^^&1.2.250.1.71.4.2.2.1234&ISO"


def test_document_is_mdm_t02_with_the_base64_in_obx_ed() -> None:
    result = run(d.document_bundle())
    data = d.document_bundle()["entry"][2]["resource"]["data"]  # type: ignore[index]
    txa = (
        "TXA|1|11490-0||20261125160000||20261125160000||||||DOC-2026-0042^^1.2.250.1.213.1.1.9^ISO|||||AU||AV"
    )
    assert er7(result) == [
        lines(
            msh("MDM^T02^MDM_T02", "P|2.5|||||FRA|UNICODE UTF-8"),
            "EVN||20261125160000",
            PID,
            "PV1|1|N",
            txa,
            f"OBX|1|ED|11490-0^Lettre de sortie^LN||^TEXT^XML^Base64^{data}||||||F",
        )
    ]


def test_replacement_is_mdm_t10_naming_the_replaced_document() -> None:
    msg = run(d.document_bundle(replaces=True)).messages[0]
    assert msg.get("MSH-9.2") == "T10"
    assert msg.get_raw("TXA-12") == "DOC-2026-0043^^1.2.250.1.213.1.1.9^ISO"
    assert msg.get_raw("TXA-13") == "DOC-2026-0042^^1.2.250.1.213.1.1.9^ISO"


def test_charset_8859_15_is_written_to_msh18_and_used_to_encode() -> None:
    result = LIB.map(d.patient(), header={"charset": "8859/15"}, control_id="C1", now=NOW)
    raw = result.messages[0].encode()
    assert b"|8859/15|" in raw.split(b"\r")[0]
    assert "LEFÈVRE".encode("iso8859_15") in raw
    assert Message.decode(raw).get("PID-5.1") == "LEFÈVRE"
    patient = d.patient()
    patient["name"][0]["family"] = "Łukasiewicz"  # type: ignore[index]
    with pytest.raises(EncodingError):
        LIB.map(patient, header={"charset": "8859/15"}, control_id="C1", now=NOW).messages[0].encode()


def test_a_request_no_mapping_serves_is_unsupported() -> None:
    with pytest.raises(UnsupportedMessage, match="Organization"):
        run({"resourceType": "Organization", "name": "Cabinet"})


def test_a_mistake_in_a_mapping_file_names_file_line_and_key(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "name: bad\nfocus: Patient\nevent: ADT^A28\nsegments:\n  - segment: PID\n    rules:\n"
        "      - {set: PV1-2, const: N}\n",
        "utf-8",
    )
    with pytest.raises(ConfigError) as caught:
        ReverseLibrary.load(tmp_path, reverse_functions.available())
    assert caught.value.line == 7 and caught.value.key == "set"
    assert "bad.yaml" in str(caught.value)
    (tmp_path / "bad.yaml").write_text(
        "name: bad\nfocus: Patient\nevent: ADT^A28\nsegments:\n  - segment: PID\n    rules:\n"
        "      - {set: PID-5, from: '%nobody.name'}\n",
        "utf-8",
    )
    with pytest.raises(ConfigError, match="nobody"):
        ReverseLibrary.load(tmp_path, reverse_functions.available())
