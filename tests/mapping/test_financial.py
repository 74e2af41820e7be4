"""Patient accounting: BAR^P01/P05/P06/P12 → Account (with the visit group's segments), BAR^P02 →
the Account marked inactive, DFT^P03/P11 → one ChargeItem per charge (FT1) posted to the Account.
Golden cases written from HL7 v2.5 chapter 6 (BAR_P01: PID, {PV1, DG1, PR1, GT1, IN1…}; BAR_P02:
{PID, PV1}; DFT_P03: PID, PV1, {FT1, {PR1}}, DG1, GT1, IN1), HL7 V2-to-FHIR's PID[Account] map and
FHIR R4B Account and ChargeItem, for a fictional French hospital: its IPP and its account numbers
(numéro de dossier, NDA) under OIDs of its own, a CCAM act, a CIM-10 diagnosis, amounts in EUR."""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.errors import UnknownNamespace, ValidationError
from gateway.hl7.er7 import Message
from gateway.mapping.engine import IF_ABSENT, WRITE_POLICY
from tests.mapping.checked_conversion import (
    IPP_OID,
    LIB,
    NAMESPACES,
    SENDER_SYSTEM,
    convert,
    key,
    message,
    of_type,
    segment,
)

NDA_OID = "1.2.250.1.71.4.2.2.7706"  # the hospital's account numbers (numéro de dossier)
NDA = "2027000123"
VISIT_OID = "1.2.250.1.71.4.2.2.7707"  # its visit numbers
INSURER_OID = "1.2.250.1.71.4.2.2.7708"  # a fictional insurer's numbering
CCAM = "https://smt.esante.gouv.fr/terminologie-ccam"
CIM10 = "https://smt.esante.gouv.fr/terminologie-cim-10"
RPPS = "10101010101"
ECG = "DEQP003^Électrocardiographie sur au moins 12 dérivations^CCAM"
HYPERTENSION = "I10^Hypertension essentielle (primitive)^CIM10"


def account_number(value: str = NDA) -> str:
    return f"{value}^^^CH-ARGONNE&{NDA_OID}&ISO^AN"


def pid(ipp: str = "778899", nda: str | None = None, name: str = "ROUSSEAU^Maëlle^^^^^L") -> str:
    """A PID; ``nda``: PID-18 as sent (None: no account number)."""
    fields = {3: f"{ipp}^^^CH-ARGONNE&{IPP_OID}&ISO^PI", 5: name, 7: "19830214", 8: "F"}
    if nda is not None:
        fields[18] = nda
    return segment("PID", fields)


PID = pid(nda=account_number())
PV1 = segment("PV1", {2: "I", 19: f"V-4411^^^CH-ARGONNE&{VISIT_OID}&ISO^VN", 44: "20270314080000"})
DG1 = segment("DG1", {1: "1", 3: HYPERTENSION, 6: "F"})
PR1 = segment("PR1", {1: "1", 3: ECG, 5: "20270314093000"})
GT1 = segment("GT1", {1: "1", 3: "ROUSSEAU^Jacques", 11: "SPO^Conjoint^HL70063"})
IN1 = segment("IN1", {1: "1", 3: f"CPAM-75^^^&{INSURER_OID}&ISO", 4: "CPAM de Paris", 36: "283017512345678"})
PERFORMER = f"{RPPS}^LEROY^Antoine^^^^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^^^^RPPS"


def ft1(set_id: str = "1", transaction: str = "TR-1", **more: str) -> str:
    fields = {
        1: set_id,
        2: transaction,
        4: "20270314093000",
        5: "20270315",
        6: "CG",
        7: ECG,
        10: "1",
        11: "14.26&EUR",
        19: HYPERTENSION,
        20: PERFORMER,
    }
    fields.update({int(k[1:]): v for k, v in more.items()})
    return segment("FT1", {k: v for k, v in fields.items() if v})


def bar(trigger: str, *segments: str) -> str:
    return message(f"BAR^{trigger}^BAR_{trigger}", f"EVN|{trigger}|20270315093000", *segments)


def dft(trigger: str, *segments: str) -> str:
    return message(f"DFT^{trigger}^DFT_{trigger}", f"EVN|{trigger}|20270315093000", *segments)


def only(result: Any, kind: str) -> dict[str, Any]:
    (entry,) = of_type(result, kind)
    return entry


def policy(entry: dict[str, Any]) -> str | None:
    for ext in entry["request"].get("extension", []):
        if ext["url"] == WRITE_POLICY:
            return str(ext["valueCode"])
    return None


# -- BAR: the account ----------------------------------------------------------------------------


def test_bar_p01_opens_the_account_with_its_visit_group() -> None:
    result = convert(bar("P01", PID, PV1, DG1, PR1, GT1, IN1))
    entry = only(result, "Account")
    account = entry["resource"]
    # keyed on the NDA in the hospital's account namespace, merged (BAR owns accounts)
    assert entry["request"]["url"] == f"Account?identifier=urn:oid:{NDA_OID}|{NDA}"
    assert policy(entry) == "merge"
    assert account["identifier"][0]["type"]["coding"][0]["code"] == "AN"
    assert account["status"] == "active"
    patient = only(result, "Patient")
    assert account["subject"] == [{"reference": patient["fullUrl"]}]
    guarantor = only(result, "RelatedPerson")
    assert account["guarantor"] == [{"party": {"reference": guarantor["fullUrl"]}}]
    coverage = only(result, "Coverage")
    assert account["coverage"] == [{"coverage": {"reference": coverage["fullUrl"]}}]
    # the visit group, through the shared segment rules: a CIM-10 diagnosis and a CCAM act
    condition = only(result, "Condition")["resource"]
    assert condition["code"]["coding"] == [
        {"system": CIM10, "code": "I10", "display": "Hypertension essentielle (primitive)"}
    ]
    procedure = only(result, "Procedure")["resource"]
    assert procedure["code"]["coding"][0] == {
        "system": CCAM,
        "code": "DEQP003",
        "display": "Électrocardiographie sur au moins 12 dérivations",
    }
    visit = only(result, "Encounter")
    assert condition["encounter"] == procedure["encounter"] == {"reference": visit["fullUrl"]}
    # ADT owns the visit: an accounting message only creates it when it is not known
    assert visit["request"]["method"] == "POST"
    assert key(visit).startswith(f"identifier=urn:oid:{VISIT_OID}|V-4411")
    assert visit["resource"]["account"] == [{"reference": entry["fullUrl"]}]
    assert visit["resource"]["status"] == "unknown"  # the accounting system does not know it
    assert result.degraded == []  # nothing defaulted: a strict channel takes it in


def test_an_account_number_without_its_oid_is_in_the_senders_account_namespace() -> None:
    result = convert(bar("P01", pid(nda=f"{NDA}^^^^AN"), PV1))
    assert key(only(result, "Account")) == f"identifier={SENDER_SYSTEM}/account|{NDA}"


def test_an_account_number_no_namespace_resolves_is_refused() -> None:
    """Without the sender's namespaces, a bare account number would match anyone's: refused."""
    with pytest.raises(UnknownNamespace) as refused:
        LIB.map(Message.decode(bar("P01", pid(nda=f"{NDA}^^^^AN"), PV1).encode()))
    assert refused.value.location == "PID-18[1].4"


@pytest.mark.parametrize(("trigger", "status"), [("P01", "active"), ("P06", "inactive")])
def test_the_trigger_sets_the_account_status(trigger: str, status: str) -> None:
    entry = only(convert(bar(trigger, PID, PV1)), "Account")
    assert entry["resource"]["status"] == status
    assert IF_ABSENT not in str(entry["request"])


@pytest.mark.parametrize("trigger", ["P05", "P12"])
def test_an_update_keeps_the_stored_status(trigger: str) -> None:
    """P05 and P12 say nothing of the status: "unknown" is written only if none is stored."""
    result = convert(bar(trigger, PID, PV1, DG1, PR1))
    entry = only(result, "Account")
    assert entry["resource"]["status"] == "unknown"
    assert {"url": IF_ABSENT, "valueString": "status"} in entry["request"]["extension"]
    assert any(w.startswith("Account.status") for w in result.warnings)


def test_bar_p12_replaces_the_visits_diagnoses_and_procedures() -> None:
    result = convert(bar("P12", PID, PV1, DG1, PR1))
    for kind in ("Condition", "Procedure"):
        entry = only(result, kind)
        assert entry["request"]["method"] == "PUT"
        assert entry["request"]["url"].startswith(
            f"{kind}?identifier=urn:passerelle:visit:urn:oid:{VISIT_OID}"
        )


def test_a_bar_with_two_visit_groups_is_refused_rather_than_filed_under_one_visit() -> None:
    second = PV1.replace("V-4411", "V-4412")
    text = bar("P01", PID, PV1, DG1, second, DG1.replace("I10^", "E11^"))
    with pytest.raises(ValidationError, match="visit groups"):
        LIB.map(Message.decode(text.encode()), namespaces=NAMESPACES)


def test_bar_p10_is_refused_with_its_reason() -> None:
    reason = LIB.why_unsupported("BAR^P10")
    assert reason is not None and "GP1" in reason


# -- BAR^P02: purge ------------------------------------------------------------------------------


def test_bar_p02_marks_each_patients_account_inactive_and_deletes_nothing() -> None:
    other = pid(ipp="778900", nda=account_number("2027000456"), name="MARCHAND^Lucas^^^^^L")
    result = convert(bar("P02", PID, PV1, other))
    accounts = of_type(result, "Account")
    patients = of_type(result, "Patient")
    assert [key(a) for a in accounts] == [
        f"identifier=urn:oid:{NDA_OID}|{NDA}",
        f"identifier=urn:oid:{NDA_OID}|2027000456",
    ]
    for account, patient in zip(accounts, patients, strict=True):
        assert account["resource"]["status"] == "inactive"
        assert account["resource"]["subject"] == [{"reference": patient["fullUrl"]}]
        assert policy(account) == "merge"
    # a purge writes nothing else, and deletes nothing
    assert {e["resource"]["resourceType"] for e in result.bundle["entry"]} == {"Account", "Patient"}
    assert all(e["request"]["method"] != "DELETE" for e in result.bundle["entry"])
    assert "PV1-19[1]" in " ".join(result.unmapped)


def test_bar_p02_without_an_account_number_writes_no_account() -> None:
    result = convert(bar("P02", pid(nda=None)))
    assert of_type(result, "Account") == []


# -- DFT: charges --------------------------------------------------------------------------------

CHARGES = f"urn:passerelle:account:urn:oid:{NDA_OID}:{NDA}:charge"


def test_dft_p03_posts_a_charge_to_the_account() -> None:
    result = convert(dft("P03", PID, PV1, ft1(), PR1, DG1, GT1, IN1))
    entry = only(result, "ChargeItem")
    charge = entry["resource"]
    # keyed on its transaction id within the account; the message states it whole
    assert entry["request"]["url"] == f"ChargeItem?identifier={CHARGES}|TR-1"
    assert entry["request"]["method"] == "PUT"
    assert charge["status"] == "unknown"
    assert charge["code"]["coding"] == [
        {"system": CCAM, "code": "DEQP003", "display": "Électrocardiographie sur au moins 12 dérivations"}
    ]
    assert charge["quantity"] == {"value": 1}
    assert charge["priceOverride"] == {"value": 14.26, "currency": "EUR"}
    assert charge["occurrenceDateTime"] == "2027-03-14T09:30:00+01:00"
    assert charge["enteredDate"] == "2027-03-15"
    assert charge["reason"][0]["coding"][0] == {
        "system": CIM10,
        "code": "I10",
        "display": "Hypertension essentielle (primitive)",
    }
    account = only(result, "Account")
    assert charge["account"] == [{"reference": account["fullUrl"]}]
    assert charge["subject"] == {"reference": only(result, "Patient")["fullUrl"]}
    assert charge["context"] == {"reference": only(result, "Encounter")["fullUrl"]}
    assert charge["service"] == [{"reference": only(result, "Procedure")["fullUrl"]}]
    performer = next(
        e
        for e in of_type(result, "Practitioner")
        if e["fullUrl"] == charge["performer"][0]["actor"]["reference"]
    )
    assert RPPS in {i["value"] for i in performer["resource"]["identifier"]}
    # a DFT creates the account when it is not known, and never changes it
    assert account["request"] == {
        "method": "POST",
        "url": "Account",
        "ifNoneExist": f"identifier=urn:oid:{NDA_OID}|{NDA}",
    }
    assert account["resource"]["status"] == "active"


def test_dft_p11_one_charge_item_per_charge_each_with_its_own_procedures() -> None:
    consultation = "YYYY010^Majoration de nuit^CCAM"
    second_act = PR1.replace("PR1|1|", "PR1|2|").replace("DEQP003", "DEQP005")
    text = dft("P11", PID, PV1, ft1(), PR1, ft1("2", "TR-2", c7=consultation, c11="40.00&EUR"), second_act)
    result = convert(text)
    charges = of_type(result, "ChargeItem")
    procedures = of_type(result, "Procedure")
    assert [key(c).rsplit("|", 1)[1] for c in charges] == ["TR-1", "TR-2"]
    assert [c["resource"]["service"] for c in charges] == [
        [{"reference": procedures[0]["fullUrl"]}],
        [{"reference": procedures[1]["fullUrl"]}],
    ]
    assert charges[1]["resource"]["priceOverride"] == {"value": 40, "currency": "EUR"}


def test_a_charge_without_transaction_id_is_this_messages_charge() -> None:
    result = convert(dft("P03", PID, PV1, ft1(transaction="")))
    # sender application ^ facility ^ MSH-10 ^ set id: a replay writes it again, no other message does
    assert unquote(key(only(result, "ChargeItem"))) == f"identifier={CHARGES}|SIL^CH-ARGONNE^M-17-1^1"


def test_without_an_account_number_a_charge_is_the_patients() -> None:
    result = convert(dft("P03", pid(nda=None), PV1, ft1()))
    assert of_type(result, "Account") == []
    charge = only(result, "ChargeItem")
    assert key(charge) == f"identifier=urn:passerelle:patient:urn:oid:{IPP_OID}:778899:charge|TR-1"
    assert "account" not in charge["resource"]


def test_a_payment_or_a_credit_is_not_a_charge_item() -> None:
    result = convert(dft("P03", PID, PV1, ft1(c6="PY"), ft1("2", "TR-2", c6="CD")))
    assert of_type(result, "ChargeItem") == []
    assert {"FT1-2[1]", "FT1[2]-2[1]", "FT1-11[1].1.1"} <= set(result.unmapped)


def test_a_period_of_service_and_the_procedure_code_when_no_transaction_code() -> None:
    result = convert(dft("P03", PID, PV1, ft1(c4="20270314^20270316", c7="", c25=ECG)))
    charge = only(result, "ChargeItem")["resource"]
    assert charge["occurrencePeriod"] == {"start": "2027-03-14", "end": "2027-03-16"}
    assert charge["code"]["coding"][0]["code"] == "DEQP003"


def test_a_currency_that_is_not_a_code_is_left_out_and_reported() -> None:
    result = convert(dft("P03", PID, PV1, ft1(c11="14.26&euros")))
    assert only(result, "ChargeItem")["resource"]["priceOverride"] == {"value": 14.26}
    assert "FT1-11[1].1.2" in result.unmapped
    assert any("ISO 4217" in w for w in result.warnings)


AMOUNTS = st.decimals(min_value=Decimal("-99999"), max_value=Decimal("99999"), places=2, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(amount=AMOUNTS, currency=st.sampled_from(["EUR", "CHF", "eur", "€", ""]))
def test_any_amount_reaches_price_override_exactly(amount: Decimal, currency: str) -> None:
    cp = f"{amount}&{currency}" if currency else str(amount)
    result = convert(dft("P03", PID, PV1, ft1(c11=cp)))
    price = only(result, "ChargeItem")["resource"]["priceOverride"]
    assert Decimal(str(price["value"])) == amount
    if currency in ("EUR", "CHF"):
        assert price["currency"] == currency
    else:
        assert "currency" not in price
        assert ("FT1-11[1].1.2" in result.unmapped) == bool(currency)
