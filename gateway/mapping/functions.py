"""Named functions for mapping rules: the logic that data alone cannot express.

A function takes the rule's Context and the value read (or None) and returns the
value to set (None sets nothing). Integrators add their own through the
entry-point group ``passerelle.mapping_functions``.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from datetime import datetime
from importlib.metadata import entry_points
from typing import Any
from zoneinfo import ZoneInfo

from gateway.hl7.er7 import unescape
from gateway.mapping.documents import MDM_FUNCTIONS, decode_ed
from gateway.mapping.engine import Context

# FR Core 2.1.0 and PAM FR 2.11 facts (see the project's reference notes).
FR_IDENTITY_RELIABILITY = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability"
FR_CS_0445 = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0445"
FR_CS_0203 = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"
HL7_CS_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
BIRTH_PLACE = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"
FR_INSEE_CODE = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-address-insee-code"
INSEE_COMMUNES = "https://mos.esante.gouv.fr/NOS/TRE_R13-CommuneOM/FHIR/TRE-R13-CommuneOM"
INS_OIDS = {
    "1.2.250.1.213.1.4.8": "INS-NIR",
    "1.2.250.1.213.1.4.9": "INS-NIA",
    "1.2.250.1.213.1.4.10": "INS-NIR",  # test NIR
    "1.2.250.1.213.1.4.11": "INS-NIR",  # demo NIR
}
# PID-32, HL7 table 0445 as PAM FR 2.11 uses it.
IDENTITY_STATUSES = frozenset(
    {"VIDE", "PROV", "VALI", "DOUB", "DESA", "DPOT", "DOUA", "COLP", "COLV"}
    | {"FILI", "CACH", "ANOM", "IDVER", "RECD", "IDRA", "USUR", "HOMD", "INVA"}
)
# The codes of fr-core-cs-v2-0445 by FR Core release. 2.2.0 adds the identity attributes that
# PAM FR sends as extra PID-32 repetitions (HOMA, FICT, DOUT); the extension is otherwise the same.
FR_CORE_VERSIONS = ("2.1.0", "2.2.0")
IDENTITY_CODES = {
    "2.1.0": IDENTITY_STATUSES,
    "2.2.0": IDENTITY_STATUSES | {"HOMA", "FICT", "DOUT"},
}

_TS = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?([+-]\d{4})?$")

Function = Callable[[Context, Any], Any]


def hl7_date(ctx: Context, value: Any) -> str | None:
    """HL7 DT/TS → FHIR date (YYYY, YYYY-MM or YYYY-MM-DD)."""
    m = _TS.match(str(value or ""))
    if m is None:
        if value:
            ctx.warnings.append("a date is not in HL7 form YYYY[MM[DD]]")
        return None
    year, month, day = m.group(1), m.group(2), m.group(3)
    return "-".join(p for p in (year, month, day) if p)


def hl7_datetime(ctx: Context, value: Any) -> str | None:
    """HL7 TS/DTM → FHIR dateTime. FHIR needs a zone with a time: a zoneless HL7 time is read in the
    mapping's declared time zone (Europe/Paris for the French feeds), daylight saving included."""
    m = _TS.match(str(value or ""))
    if m is None:
        if value:
            ctx.warnings.append("a timestamp is not in HL7 form YYYYMMDDHHMM[SS][+ZZZZ]")
        return None
    year, month, day, hour, minute, second, zone = m.groups()
    if not (month and day):
        return "-".join(p for p in (year, month) if p)
    date = f"{year}-{month}-{day}"
    if not hour:
        return date
    if zone:
        offset = f"{zone[:3]}:{zone[3:]}"
    else:
        local = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute or 0),
            int(second or 0),
            tzinfo=ZoneInfo(ctx.timezone),
        )
        raw = local.strftime("%z")
        offset = f"{raw[:3]}:{raw[3:]}"
    return f"{date}T{hour}:{minute or '00'}:{second or '00'}{offset}"


def pid_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """One PID-3 repetition (CX) → Identifier, with the PAM FR INS rule.

    The INS (NIR/NIA) travels only when PID-32 is VALI: otherwise it is dropped and a
    warning is recorded on the message.
    """
    value = ctx.read(".1")
    if not value:
        return None
    oid = ctx.read(".4.2")
    universal_type = ctx.read(".4.3")
    type_code = ctx.read(".5")
    ins_kind = INS_OIDS.get(oid) if universal_type == "ISO" else None
    if ins_kind is not None or type_code == "INS":
        if ctx.message.get("PID-32") != "VALI":
            ctx.warnings.append("INS received without PID-32 = VALI: identifier dropped (PAM FR rule)")
            return None
        return {
            "use": "official",
            "type": {"coding": [{"system": FR_CS_0203, "code": ins_kind or "INS-NIR"}]},
            "system": f"urn:oid:{oid}",
            "value": value,
        }
    ident: dict[str, Any] = {"value": value}
    if oid and universal_type == "ISO":
        ident["system"] = f"urn:oid:{oid}"
    if type_code:
        ident["type"] = {"coding": [{"system": HL7_CS_0203, "code": type_code}]}
        if type_code == "PI":
            ident["use"] = "usual"
    return ident


def identity_reliability(ctx: Context, _: Any) -> dict[str, Any] | None:
    """PID-32 → the FR Core identity-reliability extension: the first code of the target release's
    table 0445. The extension holds one status; any other code is reported, not dropped silently."""
    known = IDENTITY_CODES.get(ctx.fr_core_version, IDENTITY_STATUSES)
    codes = [c for c in ctx.message.repetitions("PID-32") if c]
    status = next((c for c in codes if c in known), None)
    left = [c for c in codes if c != status]
    if left:
        ctx.warnings.append(
            f"PID-32: {', '.join(left)} not carried by the FR Core {ctx.fr_core_version} identity-reliability"
            " extension (one status of its table 0445)"
        )
    if status is None:
        return None
    return {
        "url": FR_IDENTITY_RELIABILITY,
        "extension": [{"url": "identityStatus", "valueCoding": {"system": FR_CS_0445, "code": status}}],
    }


def birth_place(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The PID-11 repetition with XAD-7 = BDL → patient-birthPlace with the INSEE commune code."""
    for rep in ctx.message.repetitions("PID-11"):
        seps = ctx.message.separators
        parts = [unescape(p, seps, ctx.message.codec) for p in rep.split(seps.component)]
        if len(parts) >= 7 and parts[6] == "BDL":
            address: dict[str, Any] = {}
            if len(parts) > 2 and parts[2]:
                address["city"] = parts[2]
            if len(parts) > 8 and parts[8]:
                address["extension"] = [
                    {"url": FR_INSEE_CODE, "valueCoding": {"system": INSEE_COMMUNES, "code": parts[8]}}
                ]
            if len(parts) > 5 and parts[5]:
                address["country"] = parts[5]
            return {"url": BIRTH_PLACE, "valueAddress": address} if address else None
    return None


def oid_system(ctx: Context, value: Any) -> str | None:
    """An OID (from an HD or EI universal id) → the FHIR system urn:oid:…; anything else is left out."""
    text = str(value or "")
    return f"urn:oid:{text}" if re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", text) else None


# HL7 table 0396 coding-system names → FHIR system URIs (only those we are sure of; others stay local).
CODING_SYSTEMS = {
    "LN": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "UCUM": "http://unitsofmeasure.org",
    "I10": "http://hl7.org/fhir/sid/icd-10",
}
UCUM = "http://unitsofmeasure.org"
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_INTERPRETATIONS = frozenset(
    {"N", "A", "AA", "H", "HH", "L", "LL", "<", ">", "I", "R", "S", "U", "D", "B", "W"}
)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def cwe_concept(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current CWE/CE (inside an 'each', or the field the rule read) → CodeableConcept."""
    code, display, system_name = ctx.read(".1"), ctx.read(".2"), ctx.read(".3")
    if not (code or display):
        return None
    coding: dict[str, Any] = {}
    if system_name in CODING_SYSTEMS:
        coding["system"] = CODING_SYSTEMS[system_name]
    if code:
        coding["code"] = code
    if display:
        coding["display"] = display
    concept: dict[str, Any] = {"coding": [coding]}
    if display:
        concept["text"] = display
    return concept


def _number(text: str) -> float | int | None:
    if not _NUMBER.match(text.strip()):
        return None
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def _quantity(ctx: Context, number: float | int) -> dict[str, Any]:
    quantity: dict[str, Any] = {"value": number}
    unit = ctx.message.get(f"OBX[{_occ(ctx)}]-6.1") if ctx.segment else ""
    if unit:
        quantity["unit"] = unit
        if ctx.message.get(f"OBX[{_occ(ctx)}]-6.3") == "UCUM":
            quantity["system"], quantity["code"] = UCUM, unit
    return quantity


def _occ(ctx: Context) -> int:
    return ctx.segment[1] if ctx.segment else 1


def obx_value(ctx: Context, _: Any) -> dict[str, Any] | None:
    """OBX-5 by its type OBX-2 → Observation.value[x] (merged into the resource)."""
    n = _occ(ctx)
    kind = ctx.read("OBX-2")
    ctx.read("OBX-6")  # units are read with the value
    reps = ctx.message.repetitions(f"OBX[{n}]-5")
    ctx.consumed.add(("OBX", n, 5))
    if not reps:
        return None
    first = ctx.message.get(f"OBX[{n}]-5")
    if kind == "NM":
        number = _number(first)
        if number is None:
            ctx.warnings.append(f"OBX[{n}]-5: NM value is not a number; left out")
            return None
        return {"valueQuantity": _quantity(ctx, number)}
    if kind == "SN":
        comparator = ctx.message.get(f"OBX[{n}]-5.1")
        num1 = _number(ctx.message.get(f"OBX[{n}]-5.2"))
        sep = ctx.message.get(f"OBX[{n}]-5.3")
        num2 = _number(ctx.message.get(f"OBX[{n}]-5.4"))
        if num1 is not None and sep == "-" and num2 is not None:
            return {"valueRange": {"low": _quantity(ctx, num1), "high": _quantity(ctx, num2)}}
        if num1 is not None and sep in (":", "/") and num2 is not None:
            return {"valueRatio": {"numerator": {"value": num1}, "denominator": {"value": num2}}}
        if num1 is not None and not sep:
            quantity = _quantity(ctx, num1)
            if comparator in ("<", "<=", ">=", ">"):
                quantity["comparator"] = comparator
            return {"valueQuantity": quantity}
        ctx.warnings.append(f"OBX[{n}]-5: SN value not understood; left out")
        return None
    if kind in ("ST", "TX", "FT"):
        lines = [ctx.message.get(f"OBX[{n}]-5[{i}]") for i in range(1, len(reps) + 1)]
        return {"valueString": "\n".join(lines)}
    if kind in ("CE", "CWE"):
        saved = ctx.scope
        ctx.scope = reps[0]
        try:
            concept = cwe_concept(ctx, None)
        finally:
            ctx.scope = saved
        return {"valueCodeableConcept": concept} if concept else None
    if kind == "CX":
        return {"valueString": ctx.message.get(f"OBX[{n}]-5.1")}
    if kind in ("DT", "TS", "DTM"):
        value = hl7_datetime(ctx, ctx.message.get(f"OBX[{n}]-5.1"))
        return {"valueDateTime": value} if value else None
    if kind == "ED":  # mapped as DocumentReference + Binary, not as an Observation value
        return None
    ctx.warnings.append(f"OBX[{n}]-2: value type {kind or '(empty)'} is not mapped; value left out")
    return None


def reference_range(ctx: Context, value: Any) -> dict[str, Any] | None:
    """OBX-7 "low-high" (or "<x", ">x") → Observation.referenceRange."""
    text = str(value or "").strip()
    m = re.fullmatch(r"([+-]?[\d.]+)\s*-\s*([+-]?[\d.]+)", text)
    if m:
        low, high = _number(m.group(1)), _number(m.group(2))
        if low is not None and high is not None:
            return {"low": _quantity(ctx, low), "high": _quantity(ctx, high)}
    return {"text": text} if text else None


def interpretation(ctx: Context, value: Any) -> dict[str, Any] | None:
    """OBX-8 (table 0078) → v3 ObservationInterpretation, whose codes these are."""
    code = str(value or "")
    if code not in _INTERPRETATIONS:
        ctx.warnings.append(f"OBX-8: interpretation {code!r} not in table 0078; left out")
        return None
    return {"coding": [{"system": V3_INTERPRETATION, "code": code}]}


def observation_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The filler order number (OBR-3) and the OBX set id: a stable identity, so a replay updates."""
    order, oid = ctx.read("OBR-3.1"), ctx.read("OBR-3.3")
    set_id = ctx.read("OBX-1") or str(_occ(ctx))
    if not order:
        return None
    ident: dict[str, Any] = {"value": f"{order}-{set_id}"}
    system = oid_system(ctx, oid)
    if system:
        ident["system"] = system
    return ident


RPPS_SYSTEM = "https://rpps.esante.gouv.fr"
IDNPS_OID = "1.2.250.1.71.4.2.1"
FR_CORE_PRACTITIONER = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-practitioner"


def practitioner_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current XCN → Identifier shaped to the FR Core 2.1.0 Practitioner slices.

    XCN-13 says which number XCN-1 is (PAM FR: RPPS, ADELI, IDNPS). RPPS → slice ``rpps``,
    IDNPS → slice ``idNatPs``; ADELI is typed but FR Core 2.1.0 gives it no system, so none is
    invented (the IDNPS OID would claim the idNatPs slice, whose values carry a prefix).
    Any other kind keeps the OID of XCN-9, typed with HL7 table 0203.
    """
    value, kind = ctx.read(".1"), ctx.read(".13")
    if not value:
        return None
    oid, universal_type = ctx.read(".9.2"), ctx.read(".9.3")
    ident: dict[str, Any] = {"value": value}
    if kind == "RPPS":
        ident["system"] = RPPS_SYSTEM
    elif kind == "IDNPS" or (not kind and oid == IDNPS_OID and universal_type == "ISO"):
        kind = "IDNPS"
        ident["system"] = f"urn:oid:{IDNPS_OID}"
    elif kind != "ADELI" and oid and universal_type == "ISO" and oid != IDNPS_OID:
        ident["system"] = f"urn:oid:{oid}"
    if kind in ("RPPS", "ADELI", "IDNPS"):
        ident["type"] = {"coding": [{"system": FR_CS_0203, "code": kind}]}
    elif kind:
        ident["type"] = {"coding": [{"system": HL7_CS_0203, "code": kind}]}
    return ident


FINESS_SYSTEM = "https://finess.esante.gouv.fr"
URI_SYSTEM = "urn:ietf:rfc:3986"
# HD-3 as IHE France uses it: M = FINESS of the legal entity (EJ), N = of the site (EG).
_FINESS_KINDS = {"M": "FINEJ", "N": "FINEG"}


def _hd_identifier(ctx: Context, uid: str, kind: str) -> dict[str, Any] | None:
    if not uid:
        return None
    if kind in _FINESS_KINDS:
        return {
            "use": "official",
            "type": {"coding": [{"system": FR_CS_0203, "code": _FINESS_KINDS[kind]}]},
            "system": FINESS_SYSTEM,
            "value": uid,
        }
    if kind == "ISO" and oid_system(ctx, uid):
        return {"system": URI_SYSTEM, "value": f"urn:oid:{uid}"}
    return None  # a local namespace identifies nothing outside the sender


def hd_organization_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current HD (MSH-4, inside a 'scope') → the FR Core Organization identifier: FINESS
    EJ/EG (HD-3 M/N) in the ``finess`` slice, an OID as a URI; a local name gives none."""
    return _hd_identifier(ctx, ctx.read(".2"), ctx.read(".3"))


def pl_facility_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The facility (PL-4, an HD) of the current location → Organization identifier, as above."""
    return _hd_identifier(ctx, ctx.read(".4.2"), ctx.read(".4.3"))


def hl7_instant(ctx: Context, value: Any) -> str | None:
    """HL7 TS → FHIR instant, which needs a time to the second: a date alone is left out."""
    text = hl7_datetime(ctx, value)
    return text if text and "T" in text else None


def _document_key(ctx: Context) -> str | None:
    """A stable name for the document of this OBX: its order (OBR-3) and set id."""
    order = ctx.read("OBR-3.1")
    if not order:
        return None
    return f"{ctx.read('OBR-3.3')}|{order}|{ctx.read('OBX-1') or _occ(ctx)}"


def document_binary(ctx: Context, _: Any) -> dict[str, Any] | None:
    """OBX ED → Binary (merged into the resource), with an id derived from the order and set id
    so that a replay updates the same Binary."""
    found = decode_ed(ctx)
    if found is None:
        return None
    content_type, raw = found
    binary: dict[str, Any] = {"contentType": content_type, "data": base64.b64encode(raw).decode()}
    key = _document_key(ctx)
    if key is None:
        ctx.warnings.append("OBX ED without OBR-3: the Binary has no stable id; a replay adds another")
    else:
        binary["id"] = "doc-" + hashlib.sha256(key.encode()).hexdigest()[:40]
    return binary


def document_attachment(ctx: Context, _: Any) -> dict[str, Any] | None:
    """OBX ED → Attachment pointing at its Binary, with size and SHA-1 hash as PDSm asks."""
    found = decode_ed(ctx)
    if found is None:
        return None
    content_type, raw = found
    attachment: dict[str, Any] = {
        "contentType": content_type,
        "size": len(raw),
        "hash": base64.b64encode(hashlib.sha1(raw).digest()).decode(),  # noqa: S324 - FHIR says SHA-1
    }
    key = _document_key(ctx)
    if key is not None:
        attachment["url"] = "Binary/doc-" + hashlib.sha256(key.encode()).hexdigest()[:40]
    title = ctx.read("OBX-3.2")
    if title:
        attachment["title"] = title
    return attachment


def decimal(ctx: Context, value: Any) -> float | int | None:
    """An NM field → a JSON number; anything else is reported and left out."""
    number = _number(str(value or ""))
    if number is None and value:
        ctx.warnings.append("a numeric field holds no number; left out")
    return number


PASSERELLE_SEGMENT = "urn:passerelle:hl7v2-segment:"


def _segment_extension(name: str) -> Function:
    def keep(ctx: Context, _: Any) -> dict[str, Any] | None:
        """Every non-empty field of the segment as a sub-extension: kept whole, never dropped."""
        segment = ctx.message.segment(name)
        if segment is None:
            return None
        parts = []
        for n in range(1, len(segment) + 1):
            value = ctx.read(f"{name}-{n}") if segment.field(n) else ""
            if value.strip():
                parts.append({"url": f"{name}-{n}", "valueString": segment.field(n)})
        return {"url": PASSERELLE_SEGMENT + name, "extension": parts} if parts else None

    return keep


BUILTIN: dict[str, Function] = {
    # PAM FR Z segments whose FHIR form FR Core does not fix: kept field by field (raw ER7).
    "zfa_extension": _segment_extension("ZFA"),
    "zfd_extension": _segment_extension("ZFD"),
    "decimal": decimal,
    "practitioner_identifier": practitioner_identifier,
    "hd_organization_identifier": hd_organization_identifier,
    "pl_facility_identifier": pl_facility_identifier,
    "hl7_instant": hl7_instant,
    "document_binary": document_binary,
    "document_attachment": document_attachment,
    "cwe_concept": cwe_concept,
    "obx_value": obx_value,
    "reference_range": reference_range,
    "interpretation": interpretation,
    "observation_identifier": observation_identifier,
    "oid_system": oid_system,
    "hl7_date": hl7_date,
    "hl7_datetime": hl7_datetime,
    "pid_identifier": pid_identifier,
    "identity_reliability": identity_reliability,
    "birth_place": birth_place,
}


def available() -> dict[str, Function]:
    """Built-in functions plus those registered by installed packages."""
    found = {**BUILTIN, **MDM_FUNCTIONS}
    for ep in entry_points(group="passerelle.mapping_functions"):
        found[ep.name] = ep.load()
    return found
