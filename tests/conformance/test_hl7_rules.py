"""Every HL7v2 rule: a conforming message passes it, a non-conforming one breaks it at the exact place."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.hl7v2.validator import validate_hl7
from conformance.suite import DATA_DIR
from gateway.hl7.er7 import Message

HL7 = DATA_DIR / "hl7"


def load(name: str) -> Message:
    return Message.decode((HL7 / f"{name}.hl7").read_bytes(), default_charset="UNICODE UTF-8")


def found(msg: Message | bytes, **kw: str) -> set[tuple[str, str]]:
    return {(f.rule, f.location) for f in validate_hl7(msg, **kw)}


def drop_segment(name: str) -> Callable[[Message], Message]:
    def change(msg: Message) -> Message:
        text = "\r".join(s.to_er7() for s in msg.segments if s.name != name) + "\r"
        return Message.parse(text)

    return change


def setting(path: str, value: str) -> Callable[[Message], Message]:
    def change(msg: Message) -> Message:
        msg.set_raw(path, value)
        return Message.parse(msg.to_er7())

    return change


def repetitions(path: str, values: list[str]) -> Callable[[Message], Message]:
    def change(msg: Message) -> Message:
        msg.set_repetitions(path, values)
        return Message.parse(msg.to_er7())

    return change


# Sent on purpose although they break one rule: the receiver must cope with what real senders do.
TOLERATED = {
    "a01-admission-prov-with-ins": {("PAMFR-INS-001", "PID-3[2]")},  # PAM FR: integrate, drop the INS
    "oru-r01-thin-pid": {("HL7-FLD-004", "OBR-3")},  # an EI with its OID: over v2.5's 22 (a warning)
}
CONFORMING = [
    p.stem for p in sorted(HL7.glob("*.hl7")) if not p.stem.startswith("bad-") and p.stem not in TOLERATED
]

# (base message, change, rule id, location)
BROKEN = [
    ("a01-admission", drop_segment("PV1"), "HL7-SEG-001", "PV1"),
    ("a01-admission", lambda m: Message.parse(m.to_er7() + "MRG|X\r"), "HL7-SEG-002", "MRG"),
    ("a01-admission", setting("EVN-2", ""), "HL7-FLD-001", "EVN-2"),
    ("a01-admission", setting("PID-7", "1982~1983"), "HL7-FLD-002", "PID-7"),
    ("a01-admission", setting("PID-7.1", "17/03/1982"), "HL7-FLD-003", "PID-7[1].1"),
    ("a01-admission", setting("MSH-9.2", "A08"), "PAMFR-TRIG-002", "MSH-9.2"),
    ("a01-admission", setting("MSH-9.2", "A60"), "PAMFR-TRIG-001", "MSH-9.2"),
    ("a02-transfer", setting("MSH-9.3", "ADT_A01"), "PAMFR-STRUCT-001", "MSH-9.3"),
    ("a01-admission", setting("MSH-12", "2.5"), "PAMFR-MSH12-001", "MSH-12"),
    ("a01-admission", setting("MSH-21", "2.10^IHE_FRANCE-2.10-PAM"), "PAMFR-MSH21-001", "MSH-21"),
    ("a01-admission", drop_segment("ZBE"), "PAMFR-ZBE-001", "ZBE"),
    ("a01-admission", setting("ZBE-1", ""), "PAMFR-ZBE-002", "ZBE-1"),
    ("a01-admission", setting("ZBE-3", "X"), "PAMFR-ZBE-003", "ZBE-3"),
    ("a01-admission", setting("ZBE-4", "DELETE"), "PAMFR-ZBE-004", "ZBE-4"),
    ("a01-admission", setting("ZBE-4", "UPDATE"), "PAMFR-ZBE-005", "ZBE-4"),
    ("a11-cancel-admission", setting("ZBE-6", ""), "PAMFR-ZBE-006", "ZBE-6"),
    ("z99-update-movement", setting("ZBE-4", "INSERT"), "PAMFR-ZBE-007", "ZBE-4"),
    ("a12-cancel-transfer", setting("ZBE-4", "INSERT"), "PAMFR-ZBE-008", "ZBE-4"),
    ("a01-admission", setting("PID-32", "OK"), "PAMFR-PID32-001", "PID-32[1]"),
    ("a01-admission", repetitions("PID-32", ["PROV", "VALI2"]), "PAMFR-PID32-001", "PID-32[2]"),
    ("a31-ins-qualified", setting("PID-32", "PROV"), "PAMFR-INS-001", "PID-3[2]"),
    ("a01-admission", setting("PID-10", "W"), "PAMFR-PID-001", "PID-10"),
    ("a01-admission", setting("PID-17", "CATH"), "PAMFR-PID-001", "PID-17"),
    ("a01-admission", setting("PID-19", "1820317999999"), "PAMFR-PID-001", "PID-19"),
    ("a01-admission", setting("PID-22", "X"), "PAMFR-PID-001", "PID-22"),
    ("a02-transfer", setting("PID-18", ""), "PAMFR-PID18-001", "PID-18"),
    (
        "a31-ins-qualified",
        repetitions("PID-11", ["3 place du Marché^^Dijon^^21000^FRA^H"]),
        "PAMFR-BDL-001",
        "PID-11",
    ),
    ("a01-admission", setting("PV1-2", "X"), "PAMFR-PV1-001", "PV1-2"),
]


@pytest.mark.parametrize("name", CONFORMING)
def test_the_suite_messages_conform(name: str) -> None:
    assert validate_hl7(load(name)) == []


@pytest.mark.parametrize("name", sorted(TOLERATED))
def test_the_tolerated_messages_break_only_their_one_rule(name: str) -> None:
    assert found(load(name)) == TOLERATED[name]


@pytest.mark.parametrize(
    ("base", "change", "rule", "location"), BROKEN, ids=[f"{b[2]}@{b[3]}" for b in BROKEN]
)
def test_each_rule_is_reported_with_its_location(
    base: str, change: Callable[[Message], Message], rule: str, location: str
) -> None:
    assert (rule, location) not in found(load(base))
    assert (rule, location) in found(change(load(base)))


def test_unreadable_input_is_a_fatal_finding() -> None:
    findings = validate_hl7(b"HELLO|world\r")
    assert [(f.rule, f.severity.value) for f in findings] == [("HL7-MSG-001", "fatal")]


def test_unknown_structure() -> None:
    msg = setting("MSH-9", "ZZZ^Z01^ZZZ_Z01")(load("a01-admission"))
    assert ("HL7-MSG-002", "MSH-9") in found(msg)


ACK_OK = "MSH|^~\\&|R|F|S|F|20261123101500||ACK^A01^ACK|A1|P|2.5\rMSA|AA|C1\r"


def test_ack_rules() -> None:
    assert found(ACK_OK.encode(), answers="C1") == set()
    assert ("ACK-MSA-002", "MSA-2") in found(ACK_OK.encode(), answers="C2")
    assert ("ACK-MSA-001", "MSA-1") in found(ACK_OK.replace("MSA|AA", "MSA|OK").encode(), answers="C1")
    refused = ACK_OK.replace("MSA|AA", "MSA|AE")
    assert ("ACK-ERR-001", "ERR") in found(refused.encode(), answers="C1")
    with_err = refused + "ERR||PID^1^3|101^Required field missing^HL70357|E\r"
    assert ("ACK-ERR-001", "ERR") not in found(with_err.encode(), answers="C1")
    # an input without a readable MSH-10: the AR cannot echo it
    unechoed = "MSH|^~\\&|R|F|||20261123101500||ACK^^ACK|A2|P|2.5\rMSA|AR\rERR||MSH|100^x^HL70357|E\r"
    assert found(unechoed.encode(), answers="") == set()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_get_findings_not_exceptions(data: bytes) -> None:
    for f in validate_hl7(b"MSH|^~\\&|A|B|C|D|2026||ADT^A01^ADT_A01|X|P|2.5\r" + data):
        assert f.rule and f.location and f.message


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(CONFORMING), st.integers(1, 40), st.text(alphabet="AZ09^~&", max_size=8))
def test_field_edits_never_crash_the_validator(name: str, field: int, value: str) -> None:
    msg = load(name)
    msg.set_raw(f"PID-{field}", value)
    for f in validate_hl7(Message.parse(msg.to_er7())):
        assert f.severity.value in ("fatal", "error", "warning", "information")
