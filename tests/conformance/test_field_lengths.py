"""HL7 v2.5 maximum field lengths: control ids over 20 characters fail, other fields only warn."""

from __future__ import annotations

import string
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.findings import Severity
from conformance.hl7v2.validator import FLD_LENGTH, max_lengths, validate_hl7

PASSERELLE = [sys.executable, "-m", "gateway.cli"]

# Written for these tests: an ACK, and a PAM FR A01 that passes every other rule.
ACK = "MSH|^~\\&|DPI|CH-SUD|LABO|CH-SUD|20260512083000||ACK^A01^ACK|{id}|P|2.5\rMSA|AA|ORIG0001\r"
A01 = (
    "MSH|^~\\&|GAM|CH-SUD|DPI|CH-SUD|20260512083000||ADT^A01^ADT_A01|ADM0001|P|2.5^FRA^2.11"
    "|||||FRA|UNICODE UTF-8|||2.11^IHE_FRANCE-2.11-PAM\r"
    "EVN||20260512083000\r"
    "PID|||700123^^^CH-SUD&1.2.250.1.71.4.2.2.9876&ISO^PI||{name}^Paul^^^^^L||19700101|M"
    "|||12 rue des Lilas^^Lyon^^69003^FRA^H|||||||NDA700123^^^CH-SUD&1.2.250.1.71.4.2.2.9876&ISO^AN"
    "||||||||||||||PROV\r"
    "PV1||I|MED^12^1^CH-SUD||||||||||||||||V2026000123^^^CH-SUD&1.2.250.1.71.4.2.2.9876&ISO^VN\r"
    "ZBE|MVT700^CH-SUD^1.2.250.1.71.4.2.2.9876^ISO|20260512083000||INSERT|N|\r"
)
# Printable ASCII without the separators, so the text stays one MSH-10 value.
SAFE = "".join(
    c for c in string.ascii_letters + string.digits + string.punctuation + " " if c not in "|^~\\&"
)


def lengths(text: str) -> list[tuple[str, Severity, str]]:
    return [(f.location, f.severity, f.message) for f in validate_hl7(text) if f.rule == FLD_LENGTH]


def run_validate(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "message.hl7"
    path.write_bytes(text.encode())
    return subprocess.run(
        [*PASSERELLE, "validate", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_table_holds_the_v25_control_id_lengths() -> None:
    assert max_lengths()["MSH"][10] == 20
    assert max_lengths()["MSA"][2] == 20


def test_a_21_character_msh10_is_an_error() -> None:
    assert lengths(ACK.format(id="A" * 21)) == [
        ("MSH-10", Severity.ERROR, "MSH-10 is 21 characters, over v2.5's 20")
    ]


def test_a_20_character_msh10_is_fine() -> None:
    assert validate_hl7(ACK.format(id="A" * 20)) == []


def test_an_over_long_msa2_is_an_error() -> None:
    ack = ACK.format(id="ACK0001").replace("ORIG0001", "B" * 25)
    assert lengths(ack) == [("MSA-2", Severity.ERROR, "MSA-2 is 25 characters, over v2.5's 20")]


def test_an_over_long_patient_name_is_a_warning_without_the_name() -> None:
    name = "N" * 300
    found = lengths(A01.format(name=name))
    assert found == [("PID-5[1]", Severity.WARNING, "PID-5 is 311 characters, over v2.5's 250")]
    assert name not in found[0][2]


def test_each_repetition_is_counted_alone() -> None:
    ok, long = "N" * 200, "L" * 240
    assert lengths(A01.format(name=ok)) == []
    # 211 and 251 characters: the field is far over 250, yet only the second repetition is
    msg = A01.format(name=f"{ok}^Paul^^^^^L~{long}")
    assert [loc for loc, _, _ in lengths(msg)] == ["PID-5[2]"]


def test_the_occurrence_is_in_the_location() -> None:
    oru = (
        "MSH|^~\\&|LAB|CH-SUD|DPI|CH-SUD|20260512083000||ORU^R01^ORU_R01|RES0001|P|2.5\r"
        "PID|||700123^^^CH-SUD^PI||DUPONT\r"
        "OBR|1||R1^LAB|2823-3^Potassium^LN\r"
        "OBX|1|ST|2823-3^Potassium^LN||4.2||||||F\r"
        f"OBX|2|ST|2823-3^Potassium^LN||4.2||{'R' * 61}||||F\r"
    )
    assert lengths(oru) == [("OBX[2]-7", Severity.WARNING, "OBX-7 is 61 characters, over v2.5's 60")]


def test_escapes_count_as_sent() -> None:
    # 20 characters once unescaped, 22 as sent: the 22 count
    assert lengths(ACK.format(id="ABCDEFGHIJKLMNOPQR\\F\\S")) == [
        ("MSH-10", Severity.ERROR, "MSH-10 is 22 characters, over v2.5's 20")
    ]


def test_validate_fails_on_a_21_character_msh10(tmp_path: Path) -> None:
    done = run_validate(tmp_path, ACK.format(id="C" * 21))
    assert done.returncode == 1, done.stderr
    assert "HL7-FLD-004 at MSH-10" in done.stdout
    assert "C" * 21 not in done.stdout


def test_validate_passes_a_20_character_msh10(tmp_path: Path) -> None:
    done = run_validate(tmp_path, ACK.format(id="C" * 20))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "HL7-FLD-004" not in done.stdout


def test_validate_only_warns_on_a_long_patient_name(tmp_path: Path) -> None:
    done = run_validate(tmp_path, A01.format(name="N" * 300))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[warning] HL7-FLD-004 at PID-5[1]" in done.stdout
    assert "PASSED (0 error(s), 1 other)" in done.stdout


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=SAFE, min_size=1, max_size=60))
def test_a_length_finding_iff_msh10_is_over_20(control_id: str) -> None:
    found = [loc for loc, _, _ in lengths(ACK.format(id=control_id))]
    assert (found == ["MSH-10"]) == (len(control_id) > 20)
    assert found in ([], ["MSH-10"])
