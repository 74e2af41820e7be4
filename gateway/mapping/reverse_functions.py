"""Named functions for reverse (FHIR → HL7v2) mapping rules: what data alone cannot express.

A function takes the rule's Context and the value read (or None) and returns the text to set,
a ``{target: text}`` map of several fields, or None (nothing set). Integrators add their own
through the entry-point group ``passerelle.reverse_mapping_functions``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from datetime import datetime
from importlib.metadata import entry_points
from typing import Any
from zoneinfo import ZoneInfo

from gateway.mapping.functions import (
    IDENTITY_STATUSES,
    INS_OIDS,
    PASSERELLE_SEGMENT,
)
from gateway.mapping.reverse import Context, Raw, to_text

Function = Callable[[Context, Any], Any]

UCUM = "http://unitsofmeasure.org"
# FHIR system → HL7 table 0396 name, for the codings that go back out (CWE-3).
SYSTEM_NAMES = {
    "http://loinc.org": "LN",
    "http://snomed.info/sct": "SCT",
    UCUM: "UCUM",
    "http://hl7.org/fhir/sid/icd-10": "I10",
}
FR_IDENTITY_RELIABILITY = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability"
# PID-3 CX-4.1 for the INS, as PAM FR writes it.
INS_AUTHORITIES = {
    "INS-NIR": "ASIP-SANTE-INS-NIR",
    "INS-NIA": "ASIP-SANTE-INS-NIA",
    "INS-NIR-TEST": "ASIP-SANTE-INS-NIR",
    "INS-NIR-DEMO": "ASIP-SANTE-INS-NIR",
}
# A system derived from a FINESS-typed assigning authority (gateway.mapping.namespaces).
_FINESS_SYSTEM = re.compile(r"^urn:passerelle:finess:(ej|eg):([^:]+):")
_OID = re.compile(r"^urn:oid:([0-2](?:\.(?:0|[1-9][0-9]*))+)$")
_FHIR_TIME = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


# -- dates and times ---------------------------------------------------------------------------------


def v2_date(ctx: Context, value: Any) -> str | None:
    """FHIR date (or the date part of a dateTime) → HL7 DT: YYYY[MM[DD]]."""
    m = _FHIR_TIME.match(to_text(value))
    if m is None:
        if value:
            ctx.warnings.append("a date is not in FHIR form YYYY[-MM[-DD]]")
        return None
    return "".join(p for p in m.groups()[:3] if p)


def v2_datetime(ctx: Context, value: Any) -> str | None:
    """FHIR dateTime/instant → HL7 TS in the mapping's zone, without offset (as PAM FR feeds send it).

    The inbound mapping reads a zoneless time in that same zone, so the instant is kept both ways.
    """
    m = _FHIR_TIME.match(to_text(value))
    if m is None:
        if value:
            ctx.warnings.append("a dateTime is not in FHIR form")
        return None
    year, month, day, hour, minute, second, _, zone = m.groups()
    if hour is None:
        return "".join(p for p in (year, month, day) if p)
    stamp = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second or 0))
    if zone:
        stamp = datetime.fromisoformat(f"{stamp.isoformat()}{'+00:00' if zone == 'Z' else zone}")
        stamp = stamp.astimezone(ZoneInfo(ctx.timezone)).replace(tzinfo=None)
    return stamp.strftime("%Y%m%d%H%M%S")


def parse_fhir_time(value: Any) -> datetime | None:
    """A FHIR dateTime as an aware datetime (a date alone is its midnight UTC), None when unreadable."""
    text = to_text(value)
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=ZoneInfo("UTC"))


# -- identifiers -----------------------------------------------------------------------------------


def oid(ctx: Context, value: Any) -> str | None:
    """``urn:oid:1.2.3`` → ``1.2.3``; any other system is not an OID and sets nothing."""
    m = _OID.match(to_text(value))
    return m.group(1) if m else None


def _type_code(ident: dict[str, Any]) -> str:
    for coding in (ident.get("type") or {}).get("coding") or []:
        if isinstance(coding, dict) and coding.get("code"):
            return str(coding["code"])
    return ""


def pid_identifier(ctx: Context, value: Any) -> dict[str, str] | None:
    """The current Identifier → one PID-3 repetition (CX), with the PAM FR INS rule.

    The INS goes out only when the identity status is VALI (then with its OID and type INS);
    otherwise it is left out and a warning is kept on the message.
    """
    ident = ctx.node if isinstance(ctx.node, dict) else {}
    text = to_text(ident.get("value"))
    if not text:
        return None
    system = to_text(ident.get("system"))
    number = oid(ctx, system) or ""
    code = _type_code(ident)
    ins = INS_OIDS[number][0] if number in INS_OIDS else (code if code in INS_AUTHORITIES else None)
    fields = {".1": text}
    if ins is not None:
        if identity_status(ctx, None) != "VALI":
            ctx.warnings.append("INS without identity status VALI: left out of PID-3 (PAM FR rule)")
            return None
        fields.update({".4.1": INS_AUTHORITIES.get(ins, ""), ".5": "INS"})
    elif code:
        fields[".5"] = code
    finess = _FINESS_SYSTEM.match(system)
    if number:
        fields.update({".4.2": number, ".4.3": "ISO"})
    elif finess is not None:
        fields.update({".4.2": finess.group(2), ".4.3": "M" if finess.group(1) == "ej" else "N"})
    elif system:
        ctx.warnings.append("PID-3: a system that is not an OID has no HL7v2 form; value sent alone")
    assigner = to_text((ident.get("assigner") or {}).get("display"))
    if assigner and ".4.1" not in fields:
        fields[".4.1"] = assigner
    return fields


def identity_status(ctx: Context, value: Any) -> str | None:
    """The FR Core identity-reliability status of %patient (PID-32), when it is one of table 0445."""
    code = ctx.text(
        f"%patient.extension[url={FR_IDENTITY_RELIABILITY}].extension[url=identityStatus].valueCoding.code"
    )
    return code if code in IDENTITY_STATUSES else None


def ei(ctx: Context, value: Any) -> dict[str, str] | None:
    """The current Identifier → an EI (value ^ ^ OID ^ ISO) at the rule's field."""
    ident = ctx.node if isinstance(ctx.node, dict) else {}
    return _ei(ctx, ident)


def _ei(ctx: Context, ident: dict[str, Any], comp: int = 1) -> dict[str, str] | None:
    text = to_text(ident.get("value"))
    if not text:
        return None
    out = {f".{comp}": text}
    number = oid(ctx, ident.get("system"))
    if number:
        out.update({f".{comp + 2}": number, f".{comp + 3}": "ISO"})
    return out


# -- codes -------------------------------------------------------------------------------------------


def cwe(ctx: Context, value: Any) -> dict[str, str] | None:
    """The current CodeableConcept → CWE: code ^ display ^ coding-system name (table 0396)."""
    concept = ctx.node if isinstance(ctx.node, dict) else {}
    codings = [c for c in concept.get("coding") or [] if isinstance(c, dict)]
    coding = codings[0] if codings else {}
    code = to_text(coding.get("code"))
    display = to_text(coding.get("display")) or to_text(concept.get("text"))
    if not (code or display):
        return None
    out = {".1": code, ".2": display}
    system = to_text(coding.get("system"))
    if system in SYSTEM_NAMES:
        out[".3"] = SYSTEM_NAMES[system]
    elif system:
        ctx.warnings.append("a coding system with no HL7 table 0396 name: sent without one")
    return {k: v for k, v in out.items() if v}


def set_id(ctx: Context, value: Any) -> str:
    """The number of the segment being built (OBX-1, and the like)."""
    return str(ctx.occurrence)


def control_id(ctx: Context, value: Any) -> str:
    return ctx.control_id


def message_time(ctx: Context, value: Any) -> str:
    """The message's own time (MSH-7): EVN-2, the time the event was recorded."""
    return ctx.now


# -- events ------------------------------------------------------------------------------------------


def patient_event(ctx: Context, value: Any) -> str:
    """A new Patient → A28; an update → A31 (PAM FR: demographics never travel in A08)."""
    return "ADT^A31" if ctx.interaction == "update" else "ADT^A28"


_CANCEL_OF = {"ADT^A01": "ADT^A11", "ADT^A02": "ADT^A12", "ADT^A03": "ADT^A13"}


def _movement(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    focus = ctx.bindings["focus"]
    visit = ctx.bindings.get("visit") or focus
    return focus, visit


def _left_a_place(encounter: dict[str, Any]) -> bool:
    """A place the patient has left (status completed), or, where no entry has a status, several places."""
    places = [p for p in encounter.get("location") or [] if isinstance(p, dict)]
    if any("status" in p for p in places):
        return any(p.get("status") == "completed" for p in places)
    return len(places) > 1


def _inserted_event(focus: dict[str, Any], visit: dict[str, Any], previous: str) -> str:
    if previous == "finished" or (focus is visit and visit.get("status") == "finished"):
        return "ADT^A03"
    if visit.get("status") == "finished" and focus is not visit:
        return "ADT^A03"
    start = parse_fhir_time((focus.get("period") or {}).get("start"))
    admitted = parse_fhir_time((visit.get("period") or {}).get("start"))
    moved_later = focus is not visit and start is not None and admitted is not None and start > admitted
    if moved_later or _left_a_place(focus):
        return "ADT^A02"
    return "ADT^A01"


def encounter_event(ctx: Context, value: Any) -> str:
    """Which PAM FR movement an Encounter is.

    - status finished (of the visit) → A03 (discharge);
    - a movement that starts after its visit, or an Encounter that left a place → A02 (transfer);
    - otherwise → A01 (admission).
    Status ``entered-in-error`` (of the movement or the Encounter) sends the cancel trigger of the
    movement it withdraws: A11, A12 or A13 (a cancelled visit is an admission withdrawn; the last
    ``statusHistory`` entry tells a withdrawn discharge).
    """
    focus, visit = _movement(ctx)
    if focus.get("status") != "entered-in-error" and visit.get("status") != "entered-in-error":
        if visit.get("status") == "cancelled":
            return "ADT^A11"
        return _inserted_event(focus, visit, "")
    if visit.get("status") == "cancelled":
        return "ADT^A11"
    original = _original_trigger(focus)
    if f"ADT^{original}" in _CANCEL_OF:  # the inbound side kept the cancelled movement's trigger
        return _CANCEL_OF[f"ADT^{original}"]
    history = [h for h in focus.get("statusHistory") or [] if isinstance(h, dict)]
    previous = to_text(history[-1].get("status")) if history else ""
    return _CANCEL_OF[_inserted_event(focus, visit, previous)]


ORIGINAL_TRIGGER = "urn:passerelle:hl7v2-field:ZBE-6"


def _original_trigger(encounter: dict[str, Any]) -> str:
    """ZBE-6 as the inbound side kept it on the movement Encounter, else ""."""
    for ext in encounter.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == ORIGINAL_TRIGGER:
            return to_text(ext.get("valueCode"))
    return ""


def original_event(ctx: Context, value: Any) -> str | None:
    """ZBE-6: on a cancel, the trigger of the movement it withdraws."""
    for original, cancel in _CANCEL_OF.items():
        if ctx.event == cancel:
            return original.split("^")[1]
    return None


def movement_action(ctx: Context, value: Any) -> str:
    """ZBE-4: CANCEL for a cancel trigger, else INSERT."""
    return "CANCEL" if ctx.event in _CANCEL_OF.values() else "INSERT"


def movement_time(ctx: Context, value: Any) -> str | None:
    """ZBE-2: the movement's start; for a discharge told by a lone Encounter, its end."""
    focus, visit = _movement(ctx)
    period = focus.get("period") or {}
    when = period.get("start")
    if focus is visit and ctx.event in ("ADT^A03", "ADT^A13") and period.get("end"):
        when = period["end"]
    return v2_datetime(ctx, when)


def document_event(ctx: Context, value: Any) -> str:
    """A DocumentReference that replaces another → MDM^T10; otherwise MDM^T02."""
    return "MDM^T10" if ctx.values("relatesTo[code=replaces]") else "MDM^T02"


# -- observations -----------------------------------------------------------------------------------


def _number(value: Any) -> str:
    return to_text(value) if isinstance(value, int | float) and not isinstance(value, bool) else ""


def _units(quantity: dict[str, Any]) -> dict[str, str]:
    code, unit = to_text(quantity.get("code")), to_text(quantity.get("unit"))
    if quantity.get("system") == UCUM and (code or unit):
        out = {"OBX-6.1": code or unit, "OBX-6.3": "UCUM"}
        if unit and code and unit != code:
            out["OBX-6.2"] = unit
        return out
    return {"OBX-6.1": unit or code} if unit or code else {}


def obx_value(ctx: Context, value: Any) -> dict[str, str] | None:
    """The current Observation (or component) value[x] → OBX-2 (type), OBX-5 and OBX-6 (UCUM units)."""
    node = ctx.node if isinstance(ctx.node, dict) else {}
    if isinstance(node.get("valueQuantity"), dict):
        q = node["valueQuantity"]
        number = _number(q.get("value"))
        if not number:
            return None
        if q.get("comparator"):
            return {"OBX-2": "SN", "OBX-5.1": to_text(q["comparator"]), "OBX-5.2": number, **_units(q)}
        return {"OBX-2": "NM", "OBX-5": number, **_units(q)}
    if isinstance(node.get("valueRange"), dict):
        low, high = node["valueRange"].get("low") or {}, node["valueRange"].get("high") or {}
        return {
            "OBX-2": "SN",
            "OBX-5.2": _number(low.get("value")),
            "OBX-5.3": "-",
            "OBX-5.4": _number(high.get("value")),
            **_units(low or high),
        }
    if isinstance(node.get("valueRatio"), dict):
        num = (node["valueRatio"].get("numerator") or {}).get("value")
        den = (node["valueRatio"].get("denominator") or {}).get("value")
        return {"OBX-2": "SN", "OBX-5.2": _number(num), "OBX-5.3": ":", "OBX-5.4": _number(den)}
    if "valueString" in node:
        lines = to_text(node["valueString"]).split("\n")
        if len(lines) == 1:
            return {"OBX-2": "ST", "OBX-5": lines[0]}
        return {"OBX-2": "TX", **{f"OBX-5[{i}]": line for i, line in enumerate(lines, 1)}}
    if isinstance(node.get("valueCodeableConcept"), dict):
        saved = ctx.node
        ctx.node = node["valueCodeableConcept"]
        try:
            concept = cwe(ctx, None) or {}
        finally:
            ctx.node = saved
        return {"OBX-2": "CWE", **{f"OBX-5{k}": v for k, v in concept.items()}}
    for key in ("valueDateTime", "valuePeriod"):
        if key in node:
            when = node[key] if key == "valueDateTime" else (node[key] or {}).get("start")
            stamp = v2_datetime(ctx, when)
            return {"OBX-2": "TS", "OBX-5": stamp} if stamp else None
    if "valueBoolean" in node:
        return {"OBX-2": "ST", "OBX-5": "true" if node["valueBoolean"] else "false"}
    if "valueInteger" in node:
        return {"OBX-2": "NM", "OBX-5": _number(node["valueInteger"])}
    kinds = [k for k in node if k.startswith("value")]
    if kinds:
        ctx.warnings.append(f"{kinds[0]} has no OBX form here; value left out")
    return None


def reference_range(ctx: Context, value: Any) -> str | None:
    """The current Observation's first referenceRange → OBX-7 ("low-high", or its text)."""
    ranges = ctx.values("referenceRange")
    if not ranges or not isinstance(ranges[0], dict):
        return None
    first = ranges[0]
    low = _number((first.get("low") or {}).get("value"))
    high = _number((first.get("high") or {}).get("value"))
    if low and high:
        return f"{low}-{high}"
    return to_text(first.get("text")) or None


# -- documents ---------------------------------------------------------------------------------------

_SUBTYPES = {
    "text/xml": ("TEXT", "XML"),
    "application/xml": ("TEXT", "XML"),
    "application/hl7-cda+xml": ("TEXT", "XML"),
    "application/pdf": ("AP", "PDF"),
    "text/plain": ("TEXT", "PLAIN"),
    "text/html": ("TEXT", "HTML"),
    "image/jpeg": ("IM", "JPEG"),
    "image/png": ("IM", "PNG"),
    "image/tiff": ("IM", "TIFF"),
}


def document_ed(ctx: Context, value: Any) -> dict[str, str] | None:
    """The document of %focus (attachment.data, or the Binary its url names) → OBX-2 ED and OBX-5.

    OBX-5 is ``^type^subtype^Base64^data``: Base64 holds no HL7 separator, so the bytes travel as sent.
    """
    attachment = ctx.value("%focus.content[0].attachment") or {}
    binary = ctx.bindings.get("binary") or {}
    data = to_text(attachment.get("data")) or to_text(binary.get("data"))
    if not data:
        ctx.warnings.append("the document is neither in the attachment nor in a Binary of the request")
        return None
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        ctx.warnings.append("the document's content is not Base64; left out")
        return None
    mime = (to_text(attachment.get("contentType")) or to_text(binary.get("contentType"))).split(";")[0]
    kind, subtype = _SUBTYPES.get(
        mime.strip().lower(), ("AP", mime.rsplit("/", 1)[-1].upper() or "OCTET-STREAM")
    )
    return {"OBX-2": "ED", "OBX-5.2": kind, "OBX-5.3": subtype, "OBX-5.4": "Base64", "OBX-5.5": data}


def replaced_document(ctx: Context, value: Any) -> dict[str, str] | None:
    """TXA-13 (parent document number) of a replacement: the unique id of the document replaced."""
    target = ctx.bindings.get("replaced")
    if isinstance(target, dict):
        ident = target.get("masterIdentifier") or (target.get("identifier") or [None])[0]
        if isinstance(ident, dict):
            return {k.replace(".", "TXA-13.", 1): v for k, v in (_ei(ctx, ident) or {}).items()}
    ref = ctx.value("%focus.relatesTo[code=replaces].target") or {}
    ident = ref.get("identifier") if isinstance(ref, dict) else None
    if isinstance(ident, dict):
        return {k.replace(".", "TXA-13.", 1): v for k, v in (_ei(ctx, ident) or {}).items()}
    ctx.warnings.append("the replaced document is not identified (no identifier in relatesTo.target)")
    return None


def kept_segment(ctx: Context, value: Any) -> dict[str, Raw] | None:
    """A Z segment the inbound side kept whole (``urn:passerelle:hl7v2-segment:ZFA``) → its fields again."""
    assert ctx.segment is not None
    name = ctx.segment.name
    ext = ctx.value(f"%patient.extension[url={PASSERELLE_SEGMENT}{name}]")
    if not isinstance(ext, dict):
        return None
    out: dict[str, Raw] = {}
    for part in ext.get("extension") or []:
        url, text = to_text(part.get("url")), to_text(part.get("valueString"))
        if re.fullmatch(rf"{name}-\d+", url) and text and "|" not in text:
            out[url] = Raw(text)
    return out or None


BUILTIN: dict[str, Function] = {
    "v2_date": v2_date,
    "v2_datetime": v2_datetime,
    "oid": oid,
    "pid_identifier": pid_identifier,
    "identity_status": identity_status,
    "ei": ei,
    "cwe": cwe,
    "set_id": set_id,
    "control_id": control_id,
    "message_time": message_time,
    "patient_event": patient_event,
    "encounter_event": encounter_event,
    "original_event": original_event,
    "movement_action": movement_action,
    "movement_time": movement_time,
    "document_event": document_event,
    "obx_value": obx_value,
    "reference_range": reference_range,
    "document_ed": document_ed,
    "replaced_document": replaced_document,
    "kept_segment": kept_segment,
}


def available() -> dict[str, Function]:
    """Built-in functions plus those registered by installed packages."""
    found = dict(BUILTIN)
    for ep in entry_points(group="passerelle.reverse_mapping_functions"):
        found[ep.name] = ep.load()
    return found
