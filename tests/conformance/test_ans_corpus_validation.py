"""`passerelle validate` over the ANS reference messages (/work/shared/corpus/ans, read in place).

Every message with a well-formed MSH gives no error finding, save the defects the corpus is known
to carry, each recognised here from the raw text by other means than the validator's:
- SGL_sortie.er7 (and any message like it): ZBE fields shifted by one (ZBE-3 holds the action's
  date, ZBE-4 is empty, the action sits in ZBE-5): PAMFR-ZBE-003 and PAMFR-ZBE-004, required;
- ORU messages of the CI-SIS document transmission whose CORPSMAIL_PS OBX carries base64 cut by
  three characters (4k+1 of them, no decoder completes the last byte): HL7-ED-001 there, an error.
A message whose MSH-2 is corrupted gives exactly the MSH-2 error. ACKs are validated as ACKs,
with MSA-2 checked against the message they answer when it is in the corpus.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conformance.fhir.registry import default_registry
from conformance.findings import Finding
from conformance.hl7v2.validator import validate_hl7
from conformance.runner import validate_file
from gateway.hl7.er7 import Message

CORPUS = Path(os.environ.get("PASSERELLE_ANS_CORPUS", "/work/shared/corpus/ans"))
pytestmark = pytest.mark.skipif(
    not CORPUS.is_dir(), reason=f"the ANS reference corpus is absent ({CORPUS}): nothing to check"
)
FILES = sorted(p for p in CORPUS.glob("*") if p.suffix in (".er7", ".hl7")) if CORPUS.is_dir() else []
ACKS = [p for p in FILES if "_ack" in p.stem]
MESSAGES = [p for p in FILES if p not in ACKS]
SEPARATORS_OK = re.compile(rb"MSH(?P<fs>[\x21-\x7e])(?P<enc>[\x21-\x7e]{4,5})(?P=fs)")
ZBE_ACTIONS = {"INSERT", "UPDATE", "CANCEL"}


def well_formed_msh(raw: bytes) -> bool:
    """MSH-1 and MSH-2 are printable ASCII, MSH-2's characters distinct and none the field separator."""
    m = SEPARATORS_OK.match(raw.lstrip(b"\xef\xbb\xbf"))
    if m is None:
        return False
    enc = m.group("enc")
    return len(set(enc)) == len(enc) and m.group("fs") not in enc and enc.isascii() and not enc.isalnum()


def lines(raw: bytes) -> list[str]:
    return [line for line in re.split(r"\r\n|\r|\n", raw.decode("utf-8", "replace")) if line]


def zbe_shifted(raw: bytes) -> bool:
    for line in lines(raw):
        if line.startswith("ZBE|"):
            f = [*line.split("|"), "", "", "", "", ""]
            return bool(re.fullmatch(r"\d{8,14}", f[3])) and f[4] == "" and f[5] in ZBE_ACTIONS
    return False


def truncated_base64_obx(raw: bytes) -> set[str]:
    """Locations of OBX-5 (ED, Base64) data whose length without whitespace is 4k+1."""
    out = set()
    for occurrence, line in enumerate((x for x in lines(raw) if x.startswith("OBX|")), 1):
        fields = line.split("|")
        if len(fields) < 6 or fields[2] != "ED":
            continue
        reps = fields[5].split("~")
        for index, rep in enumerate(reps, 1):
            parts = rep.split("^")
            if len(parts) > 4 and parts[3].lower() == "base64":
                data = re.sub(r"\s", "", parts[4]).rstrip("=")
                if len(data) % 4 == 1:
                    prefix = "OBX" if occurrence == 1 else f"OBX[{occurrence}]"
                    out.add(f"{prefix}-5" + (f"[{index}]" if len(reps) > 1 else "") + ".5")
    return out


def findings_of(path: Path) -> list[Finding]:
    results = validate_file(path, default_registry(), None)
    assert len(results) == 1, f"{path.name}: one message per file"
    return results[0][1]


def test_the_corpus_is_there() -> None:
    assert MESSAGES and ACKS


@pytest.mark.parametrize("path", MESSAGES, ids=[p.name for p in MESSAGES])
def test_no_error_finding_but_the_known_defects(path: Path) -> None:
    raw = path.read_bytes()
    findings = findings_of(path)
    errors = {(f.rule, f.location) for f in findings if f.is_error}
    if not well_formed_msh(raw):
        assert [(f.rule, f.severity.value, f.location) for f in findings] == [
            ("HL7-MSG-001", "fatal", "MSH-2")
        ]
        return
    expected: set[tuple[str, str]] = set()
    if zbe_shifted(raw):
        expected |= {("PAMFR-ZBE-003", "ZBE-3"), ("PAMFR-ZBE-004", "ZBE-4")}
    expected |= {("HL7-ED-001", where) for where in truncated_base64_obx(raw)}
    assert errors == expected


@pytest.mark.parametrize("path", ACKS, ids=[p.name for p in ACKS])
def test_acks_are_validated_as_acks(path: Path) -> None:
    raw = path.read_bytes()
    assert Message.decode(raw).message_type == "ACK"
    assert [f for f in findings_of(path) if f.is_error] == []
    prefix = path.stem.split("_ack")[0] + "_message"
    for message in (p for p in MESSAGES if p.stem.startswith(prefix) and well_formed_msh(p.read_bytes())):
        control_id = Message.decode(message.read_bytes()).control_id
        answered = validate_hl7(raw, answers=control_id)
        assert [f for f in answered if f.is_error] == [], f"{path.name} answers {message.name}"


def test_the_document_messages_are_not_flagged_for_prt() -> None:
    # Before the French structures, every CI-SIS ORU/MDM was an HL7-SEG-002 at PRT.
    documents = [
        p
        for p in MESSAGES
        if well_formed_msh(p.read_bytes())
        and (b"|ORU^" in p.read_bytes()[:300] or b"|MDM^" in p.read_bytes()[:300])
    ]
    assert documents
    for path in documents:
        assert "HL7-SEG-002" not in {f.rule for f in findings_of(path)}, path.name


def test_passerelle_validate_flags_the_shifted_zbe_of_sgl_sortie() -> None:
    path = CORPUS / "SGL_sortie.er7"
    if not path.is_file():
        pytest.skip("SGL_sortie.er7 is not in this copy of the corpus")
    assert zbe_shifted(path.read_bytes())
    run = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "PAMFR-ZBE-003" in run.stdout and "PAMFR-ZBE-004" in run.stdout
