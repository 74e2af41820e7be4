"""Authored MDM messages (CI-SIS "Transmission de documents CDA en HL7v2", PAM FR 2.11 PID)."""

from __future__ import annotations

import base64

CDA_V1 = (
    '<?xml version="1.0" encoding="UTF-8"?><ClinicalDocument xmlns="urn:hl7-org:v3">'
    "<title>Compte rendu de consultation de cardiologie</title>"
    "<recordTarget><patientRole><patient><name><family>Lefèvre</family><given>Amélie</given>"
    "</name></patient></patientRole></recordTarget></ClinicalDocument>"
).encode()
PDF_V2 = b"%PDF-1.4\n1 0 obj << /Title (Compte rendu de consultation - version corrigee) >> endobj\n%%EOF\n"
DOC_ROOT = "1.2.250.1.213.1.1.9.42"  # the sender's document-id root OID (fictional)
IPP_OID = "1.2.250.1.71.4.2.7"
INS_NIR = "1.2.250.1.213.1.4.8"
IPP = "100001"
INS = "2840775123456"


def _segment(name: str, fields: dict[int, str], size: int) -> str:
    values = [""] * size
    for n, value in fields.items():
        values[n - 1] = value
    return name + "|" + "|".join(values)


def mdm(
    trigger: str,
    control_id: str,
    doc: str,
    *,
    parent: str = "",
    data: bytes = CDA_V1,
    kind: str = "TEXT^XML",
    result: str = "F",
    encoding: str = "Base64",
) -> bytes:
    """MDM^T02/T04/T10 for Mme Amélie Lefèvre (IPP + qualified INS), authored by Dr Jean Martin."""
    pid = _segment(
        "PID",
        {
            1: "1",
            3: f"{IPP}^^^CHU-NANTES&{IPP_OID}&ISO^PI~{INS}^^^ASIP-SANTE-INS-NIR&{INS_NIR}&ISO^INS",
            5: "Lefèvre^Amélie^Marie Jeanne^^^^L",
            7: "19840707",
            8: "F",
            32: "VALI",
        },
        32,
    )
    txa = _segment(
        "TXA",
        {
            1: "1",
            2: "11488-4",
            3: "TEXT",
            4: "20240514100000",
            6: "20240514093000",
            9: "810001234567^Martin^Jean^^^Dr^^^ASIP-SANTE-PS&1.2.250.1.71.4.2.1&ISO^D^^^IDNPS",
            12: f"{doc}^^{DOC_ROOT}^ISO",
            13: f"{parent}^^{DOC_ROOT}^ISO" if parent else "",
            17: "AU",
        },
        17,
    )
    payload = base64.b64encode(data).decode() if encoding == "Base64" else data.decode()
    lines = [
        f"MSH|^~\\&|DPI|CHU-NANTES^1.2.250.1.71.4.2.2.1234^ISO|PASSERELLE|CHU-NANTES|20240514103000||"
        f"MDM^{trigger}^MDM_T02|{control_id}|P|2.5^FRA^2.11|||||FRA|UNICODE UTF-8|||2.1^CISIS_CDA_HL7_V2",
        "EVN||20240514103000",
        pid,
        f"PV1|1|O|||||||||||||||||V2024-0042^^^CHU-NANTES&{IPP_OID}&ISO^VN",
        txa,
        f"OBX|1|ED|11488-4^CR de consultation^LN||^{kind}^{encoding}^{payload}||||||{result}",
    ]
    return ("\r".join(lines) + "\r").encode("utf-8")
