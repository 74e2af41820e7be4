"""OUL^R22/R23/R24 (unsolicited laboratory observations) → Specimen, ServiceRequest, DiagnosticReport,
Observations, keyed as ORU results are. Golden cases written from HL7 v2.5 chapter 7 (OUL_R22:
SPECIMEN {SPM, [OBX], {ORDER: OBR, [ORC], {RESULT: OBX}}}; OUL_R24: ORDER {OBR, [ORC], {SPECIMEN},
{RESULT}}) with a fictional French laboratory."""

from __future__ import annotations

from tests.mapping.checked_conversion import ORDER_OID, PID, convert, entries, key, message, of_type, segment

LAB_OID = "1.2.250.1.71.4.2.2.7703"  # the laboratory's specimen numbers
SPM = segment(
    "SPM",
    {
        1: "1",
        2: f"^PRE-1&LABO-ARGONNE&{LAB_OID}&ISO",  # EIP: the filler's number
        4: "BLD^Sang total^HL70487",
        17: "202703150745",
        18: "20270315081000",
    },
)
SPECIMEN_OBX = segment("OBX", {1: "1", 2: "NM", 3: "VOL^Volume prélevé^L", 5: "4", 6: "mL", 11: "F"})
OBR = segment(
    "OBR",
    {
        1: "1",
        2: f"CMD-41^SIH^{ORDER_OID}^ISO",
        3: f"RES-456^LABO-ARGONNE^{LAB_OID}^ISO",
        4: "24326-1^Ionogramme^LN",
        7: "202703150745",
        25: "F",
    },
)
ORC = segment("ORC", {1: "SC", 5: "CM", 9: "20270315093000"})
RESULTS = [
    segment(
        "OBX", {1: "1", 2: "NM", 3: "2951-2^Sodium^LN", 5: "141", 6: "mmol/L^^UCUM", 7: "136-145", 11: "F"}
    ),
    segment("OBX", {1: "2", 2: "NM", 3: "2823-3^Potassium^LN", 5: "4.1", 6: "mmol/L^^UCUM", 8: "N", 11: "F"}),
]


def r22(*more: str) -> str:
    return message("OUL^R22^OUL_R22", PID, SPM, SPECIMEN_OBX, OBR, ORC, *RESULTS, *more)


def test_r22_specimen_order_report_and_results() -> None:
    result = convert(r22())
    kinds = [e["resource"]["resourceType"] for e in entries(result)]
    assert kinds == ["Patient", "Specimen", "ServiceRequest", *["Observation"] * 3, "DiagnosticReport"]
    (specimen,) = of_type(result, "Specimen")
    assert specimen["request"]["url"] == f"Specimen?identifier=urn:oid:{LAB_OID}|PRE-1"
    assert specimen["resource"]["receivedTime"] == "2027-03-15T08:10:00+01:00"
    # the specimen's own observation is named by the specimen's number and its set id
    volume, sodium, potassium = (e for e in of_type(result, "Observation"))
    assert volume["resource"]["identifier"] == [
        {"system": f"urn:oid:{LAB_OID}", "value": "PRE-1-1", "assigner": {"display": "LABO-ARGONNE"}}
    ]
    assert volume["resource"]["specimen"] == {"reference": "urn:uuid:1"}
    # results: the order's filler number and the OBX set id, in the filler number's namespace
    assert [o["resource"]["identifier"][0]["value"] for o in (sodium, potassium)] == [
        "RES-456-1",
        "RES-456-2",
    ]
    assert {o["resource"]["identifier"][0]["system"] for o in (sodium, potassium)} == {f"urn:oid:{LAB_OID}"}
    assert sodium["resource"]["valueQuantity"] == {
        "value": 141,
        "unit": "mmol/L",
        "system": "http://unitsofmeasure.org",
        "code": "mmol/L",
    }
    assert sodium["resource"]["specimen"] == {"reference": "urn:uuid:1"}
    (report,) = of_type(result, "DiagnosticReport")
    assert report["resource"]["status"] == "final"
    assert report["resource"]["specimen"] == [{"reference": "urn:uuid:1"}]
    assert report["resource"]["result"] == [{"reference": "urn:uuid:4"}, {"reference": "urn:uuid:5"}]
    (order,) = of_type(result, "ServiceRequest")
    assert [(i["system"], i["value"]) for i in order["resource"]["identifier"]] == [
        (f"urn:oid:{ORDER_OID}", "CMD-41"),
        (f"urn:oid:{LAB_OID}", "RES-456"),
    ]
    assert order["resource"]["authoredOn"] == "2027-03-15T09:30:00+01:00"  # ORC-9, after its OBR


def test_r22_several_orders_of_one_specimen_share_it() -> None:
    second = segment(
        "OBR", {1: "2", 3: f"RES-457^LABO-ARGONNE^{LAB_OID}^ISO", 4: "2160-0^Créatinine^LN", 25: "F"}
    )
    creat = segment("OBX", {1: "1", 2: "NM", 3: "2160-0^Créatinine^LN", 5: "72", 6: "umol/L^^UCUM", 11: "F"})
    result = convert(r22(second, creat))
    reports = of_type(result, "DiagnosticReport")
    assert [r["resource"]["specimen"] for r in reports] == [[{"reference": "urn:uuid:1"}]] * 2
    assert [len(r["resource"]["result"]) for r in reports] == [2, 1]
    values = [o["resource"]["identifier"][0]["value"] for o in of_type(result, "Observation")]
    assert values == ["PRE-1-1", "RES-456-1", "RES-456-2", "RES-457-1"]


def test_two_labs_reusing_a_filler_number_never_share_a_key() -> None:
    other_lab = "1.2.250.1.71.4.2.2.7799"
    first = convert(r22())
    second = convert(r22().replace(LAB_OID, other_lab))
    keys = [{key(e) for e in of_type(r, "Observation")} for r in (first, second)]
    assert len(keys[0]) == 3
    assert keys[0].isdisjoint(keys[1])


def test_r23_is_served_as_r22() -> None:
    result = convert(r22().replace("OUL^R22^OUL_R22", "OUL^R23^OUL_R23"))
    assert result.mapping == "oul-specimen"


def test_r24_order_first_then_its_specimen_and_results() -> None:
    text = message("OUL^R24^OUL_R24", PID, OBR, ORC, SPM, *RESULTS)
    result = convert(text)
    assert result.mapping == "oul-order"
    (report,) = of_type(result, "DiagnosticReport")
    assert report["resource"]["specimen"] == [{"reference": "urn:uuid:1"}]
    assert [o["resource"]["identifier"][0]["value"] for o in of_type(result, "Observation")] == [
        "RES-456-1",
        "RES-456-2",
    ]


def test_an_embedded_document_is_a_document_reference_and_a_binary() -> None:
    pdf = segment(
        "OBX",
        {1: "3", 2: "ED", 3: "11502-2^CR de biologie^LN", 5: "^application^pdf^Base64^JVBERi0xLjQ=", 11: "F"},
    )
    result = convert(r22(pdf))
    (doc,) = of_type(result, "DocumentReference")
    assert doc["resource"]["content"][0]["attachment"]["contentType"] == "application/pdf"
    assert doc["resource"]["identifier"][0]["value"] == "RES-456-3"
    assert len(of_type(result, "Binary")) == 1
