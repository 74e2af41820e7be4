"""Test messages, authored for these tests: fictional French patients (PAM FR 2.11 shapes)."""

from __future__ import annotations

import time

from gateway.core.envelope import HL7_V2, Envelope
from gateway.core.ids import new_id
from gateway.core.status import Status

CHARSET_CODECS = {
    "UNICODE UTF-8": "utf-8",
    "8859/15": "iso8859_15",
    "8859/1": "latin-1",
    "ASCII": "ascii",
    "": "ascii",
}


def adt(
    control_id: str = "MSG0001",
    *,
    patient: str = "100001",
    trigger: str = "A01",
    charset: str = "UNICODE UTF-8",
    family: str = "LEFÈVRE",
    given: str = "Françoise",
    accept_ack: str = "",
    app_ack: str = "",
    facility: str = "HOPITAL-NORD",
    msh9: str | None = None,
    identity: str = "VALI",
    visit: str = "",
) -> bytes:
    structure = {
        "A01": "ADT_A01",
        "A02": "ADT_A02",
        "A03": "ADT_A03",
        "A04": "ADT_A01",
        "A08": "ADT_A01",
    }.get(trigger, "ADT_A01")
    segments = [
        f"MSH|^~\\&|DXCARE|{facility}|PASSERELLE|GHT|20261123101500||{msh9 or f'ADT^{trigger}^{structure}'}|"
        f"{control_id}|P|2.5^FRA^2.11|||{accept_ack}|{app_ack}|FRA|{charset}|||2.11^IHE_FRANCE-2.11-PAM",
        "EVN||20261123101500|||JDUPONT^DUPONT^Jean",
        f"PID|||{patient}^^^HOPITAL-NORD&1.2.250.1.71.4.2.2.1234&ISO^PI||{family}^{given}^^^^^L||"
        f"19750412|F|||12 rue des Écoles^^Besançon^^25000^FRA^H{'|' * 21}{identity}",
        # each patient's own visit number: one number for two patients is refused by the repository
        f"PV1||I|CARDIO^101^1^HOPITAL-NORD||||||||||||||||{visit or 'V' + patient}^^^HOPITAL-NORD&"
        "1.2.250.1.71.4.2.2.1234&ISO^VN",
        f"ZBE|MVT{control_id}^HOPITAL-NORD^1.2.250.1.71.4.2.2.1234^ISO|20261123101500||INSERT|N",
    ]
    text = "\r".join(segments) + "\r"
    return text.encode(CHARSET_CODECS[charset])


def journal_envelope(control_id: str, *, status: Status = Status.RECEIVED) -> Envelope:
    """An ADT^A01 as the intake journals it, for tests that write to a message store directly."""
    mid = new_id()
    return Envelope(
        id=mid,
        channel="adt",
        source="hospital",
        raw=adt(control_id),
        content_type=HL7_V2,
        sender="APP^FAC",
        control_id=control_id,
        message_type="ADT^A01",
        partition_key="p",
        received_at=time.time(),
        trace_id=mid,
        peer="127.0.0.1:1",
        status=status,
    )
