"""HL7v2 validation: v2.5 structure (from hl7apy, compiled once), PAM FR 2.11 rules, ACK rules.

In the French mode (``profile="pam-fr"``, the default) the structures of the French
specifications replace v2.5's where they differ (conformance/hl7v2/french.py: the CI-SIS
document transmission's ORU^R01 and MDM^T02/T04/T10, with PRT pre-adopted); ``profile="v2.5"``
keeps v2.5 throughout. Encapsulated data (OBX-5 of type ED, Base64) is checked in both.

The message is read with the lazy ER7 codec; nothing here parses with hl7apy.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Final

from conformance.findings import Finding, Severity
from conformance.hl7v2 import french, pamfr
from conformance.hl7v2.base64check import base64_issue
from conformance.hl7v2.structure import (
    FLD_REPEAT,
    FLD_REQUIRED,
    FLD_TYPE,
    Node,
    check_segments,
    message_structure,
    segment_spec,
    type_ok,
)
from gateway.core.errors import MessageError
from gateway.hl7.er7 import Message, unescape

UNREADABLE: Final = "HL7-MSG-001"
UNKNOWN_STRUCTURE: Final = "HL7-MSG-002"
ACK_CODE: Final = "ACK-MSA-001"
ACK_ECHO: Final = "ACK-MSA-002"
ACK_ERR: Final = "ACK-ERR-001"
FLD_LENGTH: Final = "HL7-FLD-004"
ED_BASE64: Final = "HL7-ED-001"

# Control ids: receivers truncate or refuse longer ones, so MSA-2 no longer matches MSH-10. Other
# v2.5 lengths are often exceeded in practice: a warning, or every real message would fail.
LENGTH_ERRORS: Final = frozenset({("MSH", 10), ("MSA", 2)})
_LENGTHS_FILE: Final = Path(__file__).with_name("lengths.json")

ACK_CODES: Final = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})


def validate_hl7(
    raw: bytes | str | Message,
    *,
    profile: str = "pam-fr",
    default_charset: str = "8859/15",
    answers: str | None = None,
) -> list[Finding]:
    """Every finding for one message.

    ``profile`` is ``pam-fr`` (the French structures where they differ from v2.5, PAM FR rules on
    ADT) or ``v2.5`` (v2.5 structure only).
    ``answers``: for an ACK, the MSH-10 of the message it acknowledges (MSA-2 must echo it);
    ``""`` when that message had none (an unreadable input), so MSA-2 may be empty.
    """
    if isinstance(raw, Message):
        msg = raw
    else:
        try:
            msg = (
                Message.decode(raw, default_charset=default_charset)
                if isinstance(raw, bytes)
                else Message.parse(raw)
            )
        except MessageError as exc:
            return [
                Finding(
                    UNREADABLE,
                    Severity.FATAL,
                    exc.location or "MSH",
                    f"not readable ER7: {exc.message}",
                    "structure",
                )
            ]
    findings: list[Finding] = []
    _structure(msg, findings, french_mode=profile == "pam-fr")
    check_encapsulated_data(msg, findings)
    if msg.message_type == "ACK":
        if answers == "":
            # The acknowledged input had no readable MSH-10: an empty MSA-2 is then the only answer.
            findings = [f for f in findings if not (f.rule == FLD_REQUIRED and f.location == "MSA-2")]
        check_ack(msg, answers or None, findings)
    elif profile == "pam-fr" and msg.message_type == "ADT":
        findings.extend(pamfr.check(msg))
    return findings


@functools.cache
def max_lengths() -> dict[str, dict[int, int]]:
    """v2.5 maximum field lengths: segment → {field number → length}.

    Read from HAPI's v2.5 segment classes (hapi-structures-v25); fields without a v2.5 length
    (MSA-5, withdrawn) and the separators MSH-1/MSH-2 are not in the table.
    """
    raw = json.loads(_LENGTHS_FILE.read_text(encoding="utf-8"))
    return {name: {int(number): int(size) for number, size in sizes.items()} for name, sizes in raw.items()}


@functools.cache
def _limits(name: str) -> tuple[int, ...]:
    # Indexed by field number - 1; fields without a v2.5 length never exceed theirs, nor do
    # MSH-1/MSH-2, which hold the separators themselves.
    sizes = max_lengths().get(name, {})
    skip = 2 if name == "MSH" else 0
    return tuple(
        sys.maxsize if number <= skip else sizes.get(number, sys.maxsize)
        for number in range(1, max(sizes, default=0) + 1)
    )


def _check_lengths(
    name: str, prefix: str, fields: list[str], single: frozenset[int], rep: str, findings: list[Finding]
) -> None:
    limits = _limits(name)
    # Fields past v2.5's last one have no length to check: zip stops there.
    pairs = zip(fields, limits, strict=False)
    for number in [n for n, (text, limit) in enumerate(pairs, 1) if len(text) > limit]:
        limit = limits[number - 1]
        values = fields[number - 1].split(rep)
        for index, value in enumerate(values, 1):
            # Counted on the text as sent (escapes included), as v2.5 counts a field's data.
            if len(value) <= limit:
                continue
            indexed = number not in single or len(values) > 1
            findings.append(
                Finding(
                    FLD_LENGTH,
                    Severity.ERROR if (name, number) in LENGTH_ERRORS else Severity.WARNING,
                    f"{prefix}-{number}" + (f"[{index}]" if indexed else ""),
                    f"{name}-{number} is {len(value)} characters, over v2.5's {limit}",
                    "too-long",
                )
            )


def _structure_name(msg: Message) -> str:
    declared = msg.structure
    if declared:
        return declared
    if msg.message_type == "ACK":
        return "ACK"
    if msg.message_type == "ADT" and msg.trigger in pamfr.TRIGGERS:
        return pamfr.TRIGGERS[msg.trigger]
    return f"{msg.message_type}_{msg.trigger}"


def _structure(msg: Message, findings: list[Finding], *, french_mode: bool = True) -> None:
    name = _structure_name(msg)
    entry = french.lookup(msg, name) if french_mode else None
    nodes: tuple[Node, ...] | None
    if entry is not None:
        name, label, nodes = entry.structure, entry.label, entry.nodes
    else:
        label, nodes = name, message_structure(name)
    segments = msg.segments
    if nodes is None:
        findings.append(
            Finding(
                UNKNOWN_STRUCTURE,
                Severity.ERROR,
                "MSH-9",
                f"no v2.5 message structure {name}",
                "not-supported",
            )
        )
    else:
        names = [s.name for s in segments if s.name[0] != "Z"]
        findings.extend(check_segments(label, nodes, names))
    seen: dict[str, int] = {}
    rep = msg.separators.repetition
    comp = msg.separators.component
    for seg in segments:
        occurrence = seen[seg.name] = seen.get(seg.name, 0) + 1
        spec = segment_spec(seg.name, entry.segment_version(seg.name)) if entry else segment_spec(seg.name)
        if spec is None:
            continue
        prefix = seg.name if occurrence == 1 else f"{seg.name}[{occurrence}]"
        fields = seg.fields()
        count = len(fields)
        for number in spec.required:
            if number > count or not fields[number - 1]:
                findings.append(
                    Finding(
                        FLD_REQUIRED,
                        Severity.ERROR,
                        f"{prefix}-{number}",
                        f"{seg.name}-{number} is required",
                        "required",
                    )
                )
        _check_lengths(seg.name, prefix, fields, spec.single, rep, findings)
        if seg.name == "MSH":
            continue  # MSH-1/MSH-2 hold the separators themselves
        for number in spec.single:
            if number <= count and rep in fields[number - 1]:
                findings.append(
                    Finding(
                        FLD_REPEAT,
                        Severity.ERROR,
                        f"{prefix}-{number}",
                        f"{seg.name}-{number} may not repeat",
                        "structure",
                    )
                )
        for number, component, datatype in spec.typed:
            if number > count or not fields[number - 1]:
                continue
            for index, value in enumerate(fields[number - 1].split(rep), 1):
                if component:
                    value = value.split(comp, 1)[0]
                if value and value != '""' and not type_ok(datatype, value):
                    where = f"{prefix}-{number}[{index}]" + (f".{component}" if component else "")
                    findings.append(
                        Finding(
                            FLD_TYPE,
                            Severity.ERROR,
                            where,
                            f"{seg.name}-{number} is not a valid {datatype}",
                            "value",
                        )
                    )


def check_encapsulated_data(msg: Message, findings: list[Finding]) -> None:
    """HL7-ED-001: OBX-5 of type ED with encoding (ED-4) Base64 holds valid base64 in ED-5.

    Decodable but not canonical (whitespace, missing '=' padding, non-zero unused bits) is a
    warning; anything else (a character outside the alphabet, a misplaced or extra '=', a length
    no decoder can complete) an error. Escape sequences are resolved first. The findings name
    the place and the defect, never the data.
    """
    seps = msg.separators
    for occurrence, obx in enumerate(msg.segments_named("OBX"), 1):
        if obx.field(2).split(seps.component, 1)[0] != "ED":
            continue
        values = obx.field(5).split(seps.repetition)
        prefix = "OBX" if occurrence == 1 else f"OBX[{occurrence}]"
        for index, value in enumerate(values, 1):
            parts = value.split(seps.component)
            if len(parts) < 4 or parts[3].strip().lower() != "base64":
                continue
            # ED has five components: anything past ED-5 is data with a component separator in it
            data = seps.component.join(parts[4:])
            if seps.escape in data:
                data = unescape(data, seps, msg.codec or "utf-8")
            issue = base64_issue(data)
            if issue is None:
                continue
            severity, defect = issue
            where = f"{prefix}-5" + (f"[{index}]" if len(values) > 1 else "") + ".5"
            findings.append(
                Finding(
                    ED_BASE64,
                    Severity.ERROR if severity == "error" else Severity.WARNING,
                    where,
                    f"OBX-5 (ED, encoding Base64): the data is {defect}",
                    "value",
                )
            )


def check_ack(msg: Message, answers: str | None, findings: list[Finding]) -> None:
    """ACK rules (HL7 v2.5 §2.9, IHE ITI original mode)."""
    code = msg.get("MSA-1")
    if code not in ACK_CODES:
        findings.append(
            Finding(
                ACK_CODE, Severity.ERROR, "MSA-1", "MSA-1 must be AA, AE, AR, CA, CE or CR", "code-invalid"
            )
        )
    if answers is not None and msg.get("MSA-2") != answers:
        findings.append(
            Finding(
                ACK_ECHO,
                Severity.ERROR,
                "MSA-2",
                "MSA-2 must echo MSH-10 of the acknowledged message",
                "value",
            )
        )
    if code in ("AE", "AR", "CE", "CR") and msg.segment("ERR") is None:
        findings.append(
            Finding(
                ACK_ERR,
                Severity.ERROR,
                "ERR",
                f"an {code} acknowledgement must carry an ERR segment",
                "required",
            )
        )
