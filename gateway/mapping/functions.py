"""Named functions for mapping rules: the logic that data alone cannot express.

A function takes the rule's Context and the value read (or None) and returns the
value to set (None sets nothing). What it puts into the output it reads with
``ctx.take`` (the leaf then counts as mapped); what it only looks at to decide, with
``ctx.read``. Integrators add their own through the entry-point group
``passerelle.mapping_functions``.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from gateway.core.errors import ValidationError
from gateway.hl7.er7 import Separators, unescape
from gateway.mapping.engine import NULL, Context
from gateway.mapping.namespaces import Authority, is_oid

# FR Core 2.1.0 and PAM FR 2.11 facts (see the project's reference notes).
FR_IDENTITY_RELIABILITY = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-identity-reliability"
FR_CS_0445 = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0445"
FR_CS_0203 = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"
HL7_CS_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
BIRTH_PLACE = "http://hl7.org/fhir/StructureDefinition/patient-birthPlace"
BIRTH_TIME = "http://hl7.org/fhir/StructureDefinition/patient-birthTime"
BIRTH_LIST_GIVEN_NAME = (
    "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient-birth-list-given-name"
)
FR_INSEE_CODE = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-address-insee-code"
FR_CORE_PATIENT_INS = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-patient-ins"
INSEE_COMMUNES = "https://mos.esante.gouv.fr/NOS/TRE_R13-CommuneOM/FHIR/TRE-R13-CommuneOM"
# INS OIDs → (FR Core identifier type, use): the test and demo NIRs have slices of their own.
INS_OIDS = {
    "1.2.250.1.213.1.4.8": ("INS-NIR", "official"),
    "1.2.250.1.213.1.4.9": ("INS-NIA", "temp"),
    "1.2.250.1.213.1.4.10": ("INS-NIR-TEST", "official"),
    "1.2.250.1.213.1.4.11": ("INS-NIR-DEMO", "official"),
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
# The concept map that names coding systems (HL7 table 0396): CWE-3 "LN" → http://loinc.org.
CODING_SYSTEMS_MAP = "hl7-0396-coding-system"

# HL7 DTM: each part only after the one before it; a fraction only after the seconds.
_TS = re.compile(r"^(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(\.\d+)?)?)?)?)?)?([+-]\d{4})?$")

Function = Callable[[Context, Any], Any]


def hl7_date(ctx: Context, value: Any) -> str | None:
    """HL7 DT/TS → FHIR date (YYYY, YYYY-MM or YYYY-MM-DD); a time goes in ``birth_time``."""
    m = _TS.match(str(value or ""))
    if m is None:
        if value:
            ctx.degrade("a date is not in HL7 form YYYY[MM[DD]]; left out")
        return None
    year, month, day = m.group(1), m.group(2), m.group(3)
    if not _real_date(year, month, day):
        ctx.degrade("a date names no real day; left out")
        return None
    return "-".join(p for p in (year, month, day) if p)


def _real_date(year: str, month: str | None, day: str | None) -> bool:
    try:
        datetime(int(year), int(month or 1), int(day or 1))
    except ValueError:
        return False
    return year != "0000"


def birth_time(ctx: Context, value: Any) -> dict[str, Any] | None:
    """PID-7 with a time of day → the patient-birthTime extension on ``birthDate``."""
    m = _TS.match(str(value or ""))
    if m is None or not m.group(4):
        return None
    moment = hl7_datetime(ctx, value)
    return {"extension": [{"url": BIRTH_TIME, "valueDateTime": moment}]} if moment else None


def hl7_datetime(ctx: Context, value: Any) -> str | None:
    """HL7 TS/DTM → FHIR dateTime. FHIR needs a zone with a time: a zoneless HL7 time is read in the
    mapping's declared time zone (Europe/Paris for the French feeds), daylight saving included."""
    m = _TS.match(str(value or ""))
    if m is None:
        if value:
            ctx.degrade("a timestamp is not in HL7 form YYYYMMDDHHMM[SS][+ZZZZ]; left out")
        return None
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    if (
        not _real_date(year, month, day)
        or int(hour or 0) > 23
        or int(minute or 0) > 59
        or int(second or 0) > 59
    ):
        ctx.degrade("a timestamp names no real day or time; left out")
        return None
    if zone and (int(zone[1:3]) > 14 or int(zone[3:]) > 59):
        ctx.degrade("a timestamp has an impossible zone offset; left out")
        return None
    if not (month and day):
        return "-".join(p for p in (year, month) if p)
    date = f"{year}-{month}-{day}"
    if not hour:
        return date
    offset = (
        f"{zone[:3]}:{zone[3:]}" if zone else _offset(ctx.timezone, year, month, day, hour, minute, second)
    )
    return f"{date}T{hour}:{minute or '00'}:{second or '00'}{fraction if second and fraction else ''}{offset}"


@functools.lru_cache(maxsize=8192)
def _offset(
    zone: str, year: str, month: str, day: str, hour: str, minute: str | None, second: str | None
) -> str:
    """The zone's UTC offset at that local time, ``±hh:mm`` (FHIR has no seconds in an offset);
    cached: a feed's times fall on few distinct hours."""
    local = datetime(
        int(year), int(month), int(day), int(hour), int(minute or 0), int(second or 0), tzinfo=ZoneInfo(zone)
    )
    minutes = round((local.utcoffset() or timedelta()).total_seconds() / 60)
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def hl7_instant(ctx: Context, value: Any) -> str | None:
    """HL7 TS → FHIR instant, which needs a time to the second: a date alone is left out."""
    text = hl7_datetime(ctx, value)
    return text if text and "T" in text else None


def _namespaced(
    ctx: Context, kind: str, hd: tuple[str, str, str], where: str | Callable[[], str]
) -> tuple[str, str | None]:
    """(system, assigner name) of an identifier whose authority is the HD at ``hd`` (three paths).

    The HD's parts count as mapped: the system carries its universal id and type (``urn:oid:``),
    ``assigner.display`` its namespace id. ``where`` names the field for a refusal.
    """
    (namespace, n_leaf), (universal, u_leaf), (kind_code, k_leaf) = (ctx.value(p) for p in hd)
    resolved = ctx.resolve(kind, Authority(namespace, universal, kind_code), where)
    for part, leaf in (("universal", u_leaf), ("type", k_leaf)):
        if part in resolved.used:
            ctx.consume(leaf)
    ctx.consume(n_leaf)  # the assigner's name, always kept
    return resolved.system, namespace or None


def _assigner(ident: dict[str, Any], name: str | None) -> None:
    if name:
        ident["assigner"] = {"display": name}


def _identifier_type(code: str) -> dict[str, Any]:
    return {"coding": [{"system": HL7_CS_0203, "code": code}]}


def cx_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current CX (inside ``each``) → a namespaced Identifier (``kind:`` says of what).

    CX-4 gives the system (see gateway.mapping.namespaces), CX-5 the type, CX-7/CX-8 the period.
    PAM FR: an INS (its OIDs, or type INS) travels only when PID-32 is VALI; otherwise it is left
    out with a warning and stays in the unmapped report. INS types and uses follow FR Core.
    """
    number, number_leaf = ctx.value(".1")
    if not number:
        return None
    kind = ctx.kind or "patient"
    oid, universal_type = ctx.read(".4.2"), ctx.read(".4.3")
    type_code, type_leaf = ctx.value(".5")
    ins = INS_OIDS.get(oid) if universal_type in ("ISO", "") else None
    if ins is not None or type_code == "INS":
        if identity_status(ctx)[0] != "VALI":
            ctx.warnings.append(
                f"{ctx.here()}: INS received without PID-32 = VALI: identifier left out (PAM FR rule)"
            )
            return None
        if ins is None:
            ctx.degrade(f"{ctx.here('.4')}: INS without an INS OID; typed as sent")
    ident: dict[str, Any] = {}
    if ins is not None:
        code, use = ins
        ident["use"] = use
        ident["type"] = {"coding": [{"system": FR_CS_0203, "code": code}]}
        ctx.consume(type_leaf)
    elif type_code:
        ident["type"] = _identifier_type(type_code)
        ctx.consume(type_leaf)
        if type_code == "PI":
            ident["use"] = "usual"
    system, assigner = _namespaced(ctx, kind, (".4.1", ".4.2", ".4.3"), lambda: ctx.here(".4"))
    ident["system"] = system
    ident["value"] = number
    ctx.consume(number_leaf)
    _assigner(ident, assigner)
    period = _period(ctx, ".7", ".8")
    if period:
        ident["period"] = period
    return ident


def merged_identifier(ctx: Context, value: Any) -> dict[str, Any] | None:
    """The current MRG-1 repetition of an A40 → an identifier of the record merged away. Its INS is
    left out (reported): the survivor's PID-3 carries the patient's INS, and PID-32 qualifies the
    survivor's identity, not the merged record's."""
    if not _is_ins(ctx.read(".4.2"), ctx.read(".4.3"), ctx.read(".5")):
        return cx_identifier(ctx, value)
    seps = ctx.message.separators
    others = [
        rep
        for rep in ctx.message.repetitions(ctx.field_here("MRG", 1))
        if rep.split(seps.component)[0] and not _is_ins(*_cx_authority(rep, seps))
    ]
    if not others:  # merging "whoever has this INS" into the survivor would be a guess
        raise ValidationError(
            "MRG-1 names the merged record by its INS alone: no local identifier to merge it by",
            location=ctx.field_here("MRG", 1),
        )
    ctx.warnings.append(
        f"{ctx.here()}: the merged record's INS is not carried (the survivor's PID-3 holds it)"
    )
    return None


def _is_ins(oid: str, universal_type: str, type_code: str) -> bool:
    return (oid in INS_OIDS and universal_type in ("ISO", "")) or type_code == "INS"


def _cx_authority(rep: str, seps: Separators) -> tuple[str, str, str]:
    """(CX-4.2, CX-4.3, CX-5) of one raw CX repetition."""
    parts = rep.split(seps.component)
    hd = parts[3].split(seps.subcomponent) if len(parts) > 3 else []
    return (
        hd[1] if len(hd) > 1 else "",
        hd[2] if len(hd) > 2 else "",
        parts[4] if len(parts) > 4 else "",
    )


def _period(ctx: Context, start: str, end: str) -> dict[str, str]:
    period: dict[str, str] = {}
    for key, path in (("start", start), ("end", end)):
        text, leaf = ctx.value(path)
        moment = hl7_datetime(ctx, text) if text else None
        if moment:
            period[key] = moment
            ctx.consume(leaf)
    return period


def ei_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current EI (entity id ^ namespace id ^ universal id ^ type) → a namespaced Identifier."""
    if not ctx.read(".1"):
        return None
    system, assigner = _namespaced(ctx, ctx.kind or "entity", (".2", ".3", ".4"), ctx.here(".2"))
    ident: dict[str, Any] = {"system": system, "value": ctx.take(".1")}
    _assigner(ident, assigner)
    return ident


def eip_identifiers(ctx: Context, _: Any) -> list[dict[str, Any]] | None:
    """The current EIP (placer EI ^ filler EI, each in subcomponents: SPM-2) → its identifiers."""
    out = []
    for comp, code in (("1", "PLAC"), ("2", "FILL")):
        if not ctx.read(f".{comp}.1"):
            continue
        hd = (f".{comp}.2", f".{comp}.3", f".{comp}.4")
        system, assigner = _namespaced(ctx, ctx.kind or "entity", hd, ctx.here(f".{comp}.2"))
        ident: dict[str, Any] = {
            "type": _identifier_type(code),
            "system": system,
            "value": ctx.take(f".{comp}.1"),
        }
        _assigner(ident, assigner)
        out.append(ident)
    return out or None


def order_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The order group's number for ``kind`` (placer-order or filler-order): OBR's, else ORC's."""
    kind = ctx.kind or "placer-order"
    field = 3 if kind == "filler-order" else 2
    for seg in ("OBR", "ORC"):
        base = f"{seg}-{field}"
        if ctx.read(f"{base}.1"):
            hd = (f"{base}.2", f"{base}.3", f"{base}.4")
            system, assigner = _namespaced(ctx, kind, hd, ctx.field_here(seg, field))
            code = "FILL" if field == 3 else "PLAC"
            ident: dict[str, Any] = {
                "type": _identifier_type(code),
                "system": system,
                "value": ctx.take(f"{base}.1"),
            }
            _assigner(ident, assigner)
            if seg == "OBR":  # ORC writes the same number again: it reaches the output too
                _same_number(ctx, base, f"ORC-{field}")
            return ident
    return None


def _same_number(ctx: Context, taken: str, other: str) -> None:
    """``other`` (an EI) holds exactly what ``taken`` holds: its parts count as mapped as well."""
    if all(ctx.read(f"{other}.{c}") == ctx.read(f"{taken}.{c}") for c in (1, 2, 3, 4)):
        for c in (1, 2, 3, 4):
            if ctx.locate(f"{taken}.{c}")[1] in ctx.consumed:
                ctx.take(f"{other}.{c}")


def order_number(ctx: Context) -> tuple[str, str, str] | None:
    """(path, value, kind) of the order number that names the current group's results and
    documents: the filler's (OBR-3, ORC-3), else the placer's (OBR-2, ORC-2)."""
    for path, kind in (
        ("OBR-3", "filler-order"),
        ("ORC-3", "filler-order"),
        ("OBR-2", "placer-order"),
        ("ORC-2", "placer-order"),
    ):
        value = ctx.read(f"{path}.1")
        if value:
            return path, value, kind
    return None


def result_set_id(ctx: Context, occ: int) -> str:
    """The OBX set id, when it tells this result from the others of its order; else the OBX's
    place among them (a sender that numbers every OBX 1 must not make them one result)."""
    own = ctx.read("OBX-1")
    siblings = ctx.members("OBX")
    key = ("obx-set-ids", ctx.group, ctx.section)
    counts = ctx.memo.get(key)
    if counts is None:
        counts = ctx.memo[key] = Counter(ctx.read(f"OBX[{n}]-1") for n in siblings)
    if own and counts[own] == 1:
        return own
    place = siblings.index(occ) + 1 if occ in siblings else occ
    if own:
        ctx.warnings.append(
            f"OBX[{occ}]-1: set id {own!r} repeats in its order group; its place ({place}) names it"
        )
    return f"p{place}"


def observation_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """A result's identity: its order's number (filler's, else placer's) and its OBX set id, in that
    order number's namespace; without any order number, the message's own control id (a replay
    then updates it, another message never does)."""
    occ = ctx.segment[1] if ctx.segment else 1
    set_id = result_set_id(ctx, occ)
    number = order_number(ctx)
    if number is None:
        system = ctx.system("observation", Authority(), ctx.field_here("OBX", 1))
        return {"system": system, "value": f"{ctx.message.control_id}-{occ}"}
    path, value, kind = number
    seg, _, fld = path.partition("-")
    hd = (f"{path}.2", f"{path}.3", f"{path}.4")
    system, assigner = _namespaced(ctx, kind, hd, lambda: ctx.field_here(seg, int(fld)))
    ctx.take(f"{path}.1")
    if set_id == ctx.read("OBX-1"):
        ctx.take("OBX-1")
    ident: dict[str, Any] = {"system": system, "value": f"{value}-{set_id}"}
    _assigner(ident, assigner)
    return ident


def immunization_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """An RXA's identity: its ORC's filler number (else placer number) in that number's namespace;
    without an ORC, the message's control id and the RXA (a replay updates it, another message
    never does: nothing else says two RXA are one immunization)."""
    for path, kind, code in (("ORC-3", "filler-order", "FILL"), ("ORC-2", "placer-order", "PLAC")):
        if ctx.read(f"{path}.1"):
            hd = (f"{path}.2", f"{path}.3", f"{path}.4")
            fld = int(path[-1])
            system, assigner = _namespaced(ctx, kind, hd, ctx.field_here("ORC", fld))
            ident: dict[str, Any] = {
                "type": _identifier_type(code),
                "system": system,
                "value": ctx.take(f"{path}.1"),
            }
            _assigner(ident, assigner)
            return ident
    occ = ctx.segment[1] if ctx.segment else 1
    system = ctx.system("immunization", Authority(), ctx.field_here("RXA", 1))
    return {"system": system, "value": f"{ctx.message.control_id}-{occ}"}


def annotation(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current NTE → Annotation: its comment lines (NTE-3) and when it was entered (NTE-6)."""
    if ctx.segment is None:
        return None
    n = ctx.segment[1]
    segment = ctx.find("NTE", n)
    if segment is None or not _lines(ctx, segment.field(3)).strip():
        return None
    note: dict[str, Any] = {"text": _lines(ctx, ctx.take_field("NTE", n, 3))}
    moment = hl7_datetime(ctx, ctx.read(f"NTE[{n}]-6")) if ctx.read(f"NTE[{n}]-6") else None
    if moment:
        note["time"] = moment
        ctx.take(f"NTE[{n}]-6")
    return note


def _lines(ctx: Context, raw: str) -> str:
    """A formatted-text field (FT, TX) → its repetitions as lines, unescaped (HL7's null, "", is
    no line)."""
    seps = ctx.message.separators
    return "\n".join(
        unescape(r, seps, ctx.message.codec) for r in raw.split(seps.repetition) if r != NULL
    ).strip("\n")


def appointment_notes(ctx: Context, _: Any) -> str | None:
    """Every NTE of a scheduling message, one line each: R4 Appointment has one comment."""
    lines = []
    for n in range(1, len(ctx.message.segments_named("NTE")) + 1):
        segment = ctx.find("NTE", n)
        if segment is not None and _lines(ctx, segment.field(3)).strip():
            lines.append(_lines(ctx, ctx.take_field("NTE", n, 3)))
    return "\n".join(lines) or None


def place_text(ctx: Context, _: Any) -> str | None:
    """The current PL (point of care, room, bed, facility…) as one readable text: every part kept."""
    seps = ctx.message.separators
    parts = []
    for c, comp in enumerate((ctx.scope or "").split(seps.component), 1):
        for s, sub in enumerate(comp.split(seps.subcomponent), 1):
            if sub.strip():
                parts.append(ctx.take(f".{c}.{s}"))
    return " ".join(parts) or None


def identity_status(ctx: Context) -> tuple[str | None, str | None, list[str]]:
    """The PID-32 (of the patient mapped here) status the output carries: the first code of the
    target FR Core release's table 0445; the path of its repetition; the codes left out."""
    known = IDENTITY_CODES.get(ctx.fr_core_version, IDENTITY_STATUSES)
    occ = ctx.occurrence("PID") or 1
    codes = ctx.message.repetitions(f"PID[{occ}]-32")
    rep = next((n for n, c in enumerate(codes, 1) if c in known), None)
    status = codes[rep - 1] if rep is not None else None
    left = [c for c in codes if c and c != status]
    return status, (f"PID[{occ}]-32[{rep}]" if rep is not None else None), left


def ins_profile(ctx: Context, _: Any) -> str | None:
    """FR Core's INS profile, for a Patient whose INS travels (PAM FR: PID-32 VALI, an INS in PID-3)."""
    if identity_status(ctx)[0] != "VALI":
        return None
    seps, occ = ctx.message.separators, ctx.occurrence("PID") or 1
    if not any(_is_ins(*_cx_authority(rep, seps)) for rep in ctx.message.repetitions(f"PID[{occ}]-3")):
        return None
    # The profile wants the birth given names (PID-5.3 of the birth name, L): never made up
    names = [rep.split(seps.component) for rep in ctx.message.repetitions(f"PID[{occ}]-5")]
    if not any(len(n) > 6 and n[6] == "L" and n[2] for n in names):
        ctx.warnings.append(
            f"PID[{occ}]-5: INS without the birth given names (XPN-3 of the L name): "
            "fr-core-patient-ins not claimed"
        )
        return None
    return FR_CORE_PATIENT_INS


def identity_reliability(ctx: Context, _: Any) -> dict[str, Any] | None:
    """PID-32 → the FR Core identity-reliability extension. The extension holds one status (the
    one the INS rule reads); any other code is reported, not dropped silently."""
    status, path, left = identity_status(ctx)
    if left:
        ctx.warnings.append(
            f"PID-32: {', '.join(left)} not carried by the FR Core {ctx.fr_core_version} identity-reliability"
            " extension (one status of its table 0445); in the unmapped report"
        )
    if status is None or path is None:
        return None
    ctx.take(path)
    return {
        "url": FR_IDENTITY_RELIABILITY,
        "extension": [{"url": "identityStatus", "valueCoding": {"system": FR_CS_0445, "code": status}}],
    }


def birth_place(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The PID-11 repetition with XAD-7 = BDL → patient-birthPlace with the INSEE commune code."""
    occ = ctx.occurrence("PID") or 1
    for n, rep in enumerate(ctx.message.repetitions(f"PID[{occ}]-11"), 1):
        if "BDL" not in rep:
            continue
        saved = ctx.scoped("PID", occ, 11, n, rep)
        try:
            if ctx.read(".7") != "BDL":
                continue
            address: dict[str, Any] = {}
            for key, path in (("city", ".3"), ("postalCode", ".5"), ("country", ".6")):
                _keep(ctx, address, key, path)
            code, leaf = ctx.value(".9")
            if code:
                ctx.consume(leaf)
                address["extension"] = [
                    {"url": FR_INSEE_CODE, "valueCoding": {"system": INSEE_COMMUNES, "code": code}}
                ]
            if not address:
                return None
            ctx.take(".7")
            return {"url": BIRTH_PLACE, "valueAddress": address}
        finally:
            ctx.restore(saved)
    return None


def _keep(ctx: Context, out: dict[str, Any], key: str, path: str) -> None:
    """``out[key]`` = the text at ``path`` (mapped), when there is one."""
    text, leaf = ctx.value(path)
    if text:
        out[key] = text
        ctx.consume(leaf)


def given_names(ctx: Context, _: Any) -> dict[str, Any] | None:
    """XPN-2 and XPN-3 of the current name. PAM FR sends in XPN-3 of the birth name (L) the list of
    birth given names: FR Core's birth-list-given-name extension; elsewhere XPN-3 holds further
    given names."""
    out: dict[str, Any] = {}
    first = ctx.take(".2")
    if first:
        out["given"] = [first]
    further = ctx.read(".3")
    if further:
        if ctx.read(".7") == "L" and ctx.fr_core_version:
            out["extension"] = [{"url": BIRTH_LIST_GIVEN_NAME, "valueString": ctx.take(".3")}]
        else:
            out.setdefault("given", []).append(ctx.take(".3"))
    return out or None


def _code(ctx: Context, table: str, path: str) -> Any:
    """``path``'s code through the concept map ``table`` (taken when it translates), else None."""
    code = ctx.read(path)
    found = ctx.concept_maps.get(table)
    if not code or found is None or code not in found:
        return None
    ctx.take(path)
    return found[code]


def telecom(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current XTN → ContactPoint: the number as sent (XTN-1), else the e-mail (XTN-4), else the
    unformatted number (XTN-12), else one built from country, area, local number and extension.
    XTN-3 (table 0202) gives the system, XTN-2 (table 0201) the use; the concept maps translate."""
    value, source = "", ""
    for path in (".1", ".4", ".12"):
        if ctx.read(path):
            value, source = ctx.take(path), path
            break
    if not value:
        parts = []
        for path, shape in ((".5", "+{}"), (".6", "({})"), (".7", "{}"), (".8", "ext. {}")):
            if ctx.read(path):
                parts.append(shape.format(ctx.take(path)))
        value = " ".join(parts)
    if not value:
        return None
    point: dict[str, Any] = {"value": value}
    system = _code(ctx, "hl7-0202-telecom-equipment", ".3") or _code(ctx, "hl7-0201-telecom-system", ".2")
    if system is None and not ctx.read(".3"):  # XTN-1 and XTN-12 are telephone numbers; XTN-4 an address
        system = ("email" if "@" in value else None) if source == ".4" else "phone"
    elif system is None:
        ctx.degrade(f"{ctx.here('.3')}: equipment type {ctx.read('.3')!r} not in HL7 table 0202; left out")
    if system is not None:
        point["system"] = system
    use = _code(ctx, "hl7-0201-telecom-use", ".2")
    if ctx.read(".3") == "CP":
        use = "mobile"
    elif use is None and not ctx.read(".2") and ctx.at is not None and ctx.at[0] == "PID":
        use = {13: "home", 14: "work"}.get(ctx.at[2])  # HL7: PID-13 is the home number, PID-14 work
    if use is not None:
        point["use"] = use
    rank = _number(ctx.read(".18"))
    if isinstance(rank, int) and 0 < rank <= _POSITIVE_INT_MAX:  # else left in the unmapped report
        point["rank"] = int(ctx.take(".18"))
    period = _period(ctx, ".13", ".14")
    if period:
        point["period"] = period
    return point


def address(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current XAD → Address; XAD-7 (HL7 table 0190) gives its use or type."""
    out: dict[str, Any] = {}
    lines: dict[str, Any] = {}
    _keep(ctx, lines, "street", ".1.1")
    _keep(ctx, lines, "other", ".2")
    if lines:
        out["line"] = list(lines.values())
    for key, path in _ADDRESS_PARTS:
        _keep(ctx, out, key, path)
    if not out:
        return None
    use = _code(ctx, "hl7-0190-address-use", ".7")
    kind = _code(ctx, "hl7-0190-address-type", ".7") if use is None else None
    if use is not None:
        out["use"] = use
    elif kind is not None:
        out["type"] = kind
    elif ctx.read(".7"):
        ctx.degrade(f"{ctx.here('.7')}: address type {ctx.read('.7')!r} not in HL7 table 0190; left out")
    period = _period(ctx, ".13", ".14")
    if period:
        out["period"] = period
    return out


_ADDRESS_PARTS = (
    ("city", ".3"),
    ("state", ".4"),
    ("postalCode", ".5"),
    ("country", ".6"),
    ("district", ".9"),
)


def oid_system(ctx: Context, value: Any) -> str | None:
    """An OID (from an HD or EI universal id) → the FHIR system urn:oid:…; anything else is left out."""
    text = str(value or "")
    return f"urn:oid:{text}" if is_oid(text) else None


V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_INTERPRETATIONS = frozenset(
    {"N", "A", "AA", "H", "HH", "L", "LL", "<", ">", "I", "R", "S", "U", "D", "B", "W"}
)
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


_HL7_TABLE = re.compile(r"HL7(\d{4})")


def coding_system(ctx: Context, name: str) -> str | None:
    """The URI of a coding system named as HL7 table 0396 does (LN, SCT…), from the library's
    concept map; ``HL7nnnn`` (table 0396: the HL7 table nnnn) is its terminology.hl7.org v2 code
    system; None for a name it does not know."""
    table = ctx.concept_maps.get(CODING_SYSTEMS_MAP)
    found = table.table.get(name) if table is not None else None
    if found:
        return str(found)
    hl7 = _HL7_TABLE.fullmatch(name)
    return f"http://terminology.hl7.org/CodeSystem/v2-{hl7.group(1)}" if hl7 else None


def _coding(ctx: Context, code: str, text: str, system: str) -> dict[str, Any] | None:
    """One coding of a CWE triplet (three relative paths); the system's name is taken only when it
    is known (a local name stays in the unmapped report, with a warning)."""
    coding: dict[str, Any] = {}
    _keep(ctx, coding, "code", code)
    _keep(ctx, coding, "display", text)
    if not coding:
        return None
    name, name_leaf = ctx.value(system)
    if name:
        uri = coding_system(ctx, name)
        if uri is not None:
            coding = {"system": uri, **coding}
            ctx.consume(name_leaf)
        else:
            ctx.warnings.append(
                f"{ctx.here(system)}: coding system {name!r} has no URI in concept map {CODING_SYSTEMS_MAP}; "
                "coding kept without a system"
            )
    return coding


def cwe_concept(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current CWE/CE (inside an 'each') → CodeableConcept: the code and the alternate code as
    codings, the original text (CWE-9, else the display) as text."""
    codings = []
    first = _coding(ctx, ".1", ".2", ".3")
    if first is not None:
        codings.append(first)
    alternate = _coding(ctx, ".4", ".5", ".6")
    if alternate is not None:
        codings.append(alternate)
    if not codings and not ctx.read(".9"):
        return None
    concept: dict[str, Any] = {"coding": codings} if codings else {}
    if ctx.read(".9"):
        concept["text"] = ctx.take(".9")
    elif first is not None and "display" in first:
        concept["text"] = first["display"]
    return concept


_INT64 = 2**63
_POSITIVE_INT_MAX = 2**31 - 1  # FHIR positiveInt is a 32-bit integer


def concept_at(ctx: Context, seg: str, occ: int, fld: int) -> dict[str, Any] | None:
    """The first repetition of a CWE field of a given segment occurrence → CodeableConcept."""
    reps = ctx.message.repetitions(f"{seg}[{occ}]-{fld}")
    if not reps or not reps[0].strip():
        return None
    saved = ctx.scoped(seg, occ, fld, 1, reps[0])
    try:
        return cwe_concept(ctx, None)
    finally:
        ctx.restore(saved)


def _number(text: str) -> float | int | None:
    """An HL7 number as a JSON number; None when it is not one, or when JSON would not keep every
    digit sent (an integer beyond 64 bits, a decimal with more digits than a double holds): a
    result is left out and reported rather than stored with other digits."""
    text = text.strip()
    if not _NUMBER.match(text):
        return None
    if "." not in text:
        number = int(text)
        return number if -_INT64 <= number < _INT64 else None
    value = float(text)
    return value if Decimal(repr(value)) == Decimal(text) else None


def _occ(ctx: Context) -> int:
    return ctx.segment[1] if ctx.segment else 1


def _quantity(ctx: Context, number: float | int) -> dict[str, Any]:
    """A number with the units of the current OBX (OBX-6: code ^ text ^ system)."""
    quantity: dict[str, Any] = {"value": number}
    n = _occ(ctx)
    code, text = ctx.read(f"OBX[{n}]-6.1"), ctx.read(f"OBX[{n}]-6.2")
    if code or text:
        quantity["unit"] = ctx.take(f"OBX[{n}]-6.2") if text else ctx.take(f"OBX[{n}]-6.1")
    name = ctx.read(f"OBX[{n}]-6.3")
    uri = coding_system(ctx, name) if name else None
    if code and uri is not None:
        quantity["system"], quantity["code"] = uri, ctx.take(f"OBX[{n}]-6.1")
        ctx.take(f"OBX[{n}]-6.3")
    return quantity


def obx_value(ctx: Context, _: Any) -> dict[str, Any] | None:
    """OBX-5 by its type OBX-2 → Observation.value[x] (merged into the resource). Only the first
    repetition of a coded or numeric value fits value[x]; further ones stay in the unmapped report."""
    n = _occ(ctx)
    kind = ctx.read(f"OBX[{n}]-2")
    reps = ctx.message.repetitions(f"OBX[{n}]-5")
    if not any(r.strip() for r in reps):
        return None
    value = _value_of(ctx, kind, n, reps)
    if value is not None and kind:
        ctx.take(f"OBX[{n}]-2")
    return value


def _value_of(ctx: Context, kind: str, n: int, reps: list[str]) -> dict[str, Any] | None:
    field = f"OBX[{n}]-5"
    if kind == "NM":
        number = _number(ctx.read(field))
        if number is None:
            ctx.degrade(f"{field}: NM value is not a number JSON keeps exactly; left out")
            return None
        ctx.take(field)
        return {"valueQuantity": _quantity(ctx, number)}
    if kind == "SN":
        comparator, sep = ctx.read(f"{field}.1"), ctx.read(f"{field}.3")
        num1, num2 = _number(ctx.read(f"{field}.2")), _number(ctx.read(f"{field}.4"))
        out: dict[str, Any] | None = None
        if num1 is not None and sep == "-" and num2 is not None:
            out = {"valueRange": {"low": _quantity(ctx, num1), "high": _quantity(ctx, num2)}}
        elif num1 is not None and sep in (":", "/") and num2 is not None:
            out = {"valueRatio": {"numerator": {"value": num1}, "denominator": {"value": num2}}}
        elif num1 is not None and not sep and not ctx.read(f"{field}.4"):
            quantity = _quantity(ctx, num1)
            if comparator in ("<", "<=", ">=", ">"):
                quantity["comparator"] = comparator
            elif comparator:
                ctx.degrade(f"{field}.1: comparator {comparator!r} not understood; value left out")
                return None
            out = {"valueQuantity": quantity}
        if out is None:
            ctx.degrade(f"{field}: SN value not understood; left out")
            return None
        for comp in (1, 2, 3, 4):
            ctx.take(f"{field}.{comp}")
        return out
    if kind in ("ST", "TX", "FT"):
        segment = ctx.find("OBX", n)
        text = _lines(ctx, segment.field(5)) if segment is not None else ""
        if not text.strip():
            return None
        ctx.take_field("OBX", n, 5)
        return {"valueString": text}
    if kind in ("CE", "CWE", "CNE", "CF"):
        saved = ctx.scoped("OBX", n, 5, 1, reps[0])
        try:
            concept = cwe_concept(ctx, None)
        finally:
            ctx.restore(saved)
        return {"valueCodeableConcept": concept} if concept else None
    if kind == "CX":  # an identifier as the result: its number (no value[x] holds an Identifier)
        return {"valueString": ctx.take(f"{field}.1")} if ctx.read(f"{field}.1") else None
    if kind in ("DT", "TS", "DTM"):
        moment = hl7_datetime(ctx, ctx.read(f"{field}.1"))
        if moment is None:
            return None
        ctx.take(f"{field}.1")
        return {"valueDateTime": moment}
    if kind == "TM":
        m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?", ctx.read(f"{field}.1"))
        if m is None:
            ctx.degrade(f"{field}: TM value is not a time; left out")
            return None
        ctx.take(f"{field}.1")
        return {"valueTime": f"{m.group(1)}:{m.group(2) or '00'}:{m.group(3) or '00'}"}
    if kind == "ED":  # mapped as DocumentReference + Binary, not as an Observation value
        return None
    ctx.degrade(f"OBX[{n}]-2: value type {kind or '(empty)'} is not mapped; value in the unmapped report")
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
        ctx.degrade(f"OBX-8: interpretation {code!r} not in table 0078; left out")
        return None
    return {"coding": [{"system": V3_INTERPRETATION, "code": code}]}


RPPS_SYSTEM = "https://rpps.esante.gouv.fr"
IDNPS_OID = "1.2.250.1.71.4.2.1"
FR_CORE_PRACTITIONER = "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-practitioner"


def practitioner_identifier(ctx: Context, _: Any) -> list[dict[str, Any]] | None:
    """The current XCN → Identifiers shaped to the FR Core 2.1.0 Practitioner slices.

    XCN-13 says which number XCN-1 is (PAM FR: RPPS, ADELI, IDNPS). RPPS → slice ``rpps``, and its
    national id (IDNPS = 8 + RPPS) in slice ``idNatPs``; IDNPS → ``idNatPs``; ADELI → typed, with
    its national id (IDNPS = 0 + ADELI). Any other number is namespaced by XCN-9
    (gateway.mapping.namespaces).
    """
    if not ctx.read(".1"):
        return None
    kind = ctx.read(".13")
    oid, universal_type = ctx.read(".9.2"), ctx.read(".9.3")
    national_authority = oid == IDNPS_OID and universal_type in ("ISO", "")
    if kind in _NATIONAL_PREFIX or (not kind and national_authority):
        kind = kind or "IDNPS"
        value = ctx.take(".1")
        ctx.take(".13")
        assigner = ctx.take(".9.1") if national_authority else ""
        if national_authority:
            ctx.take(".9.2")
            ctx.take(".9.3")
        out: list[dict[str, Any]] = [
            {
                "type": _fr_type("IDNPS"),
                "system": f"urn:oid:{IDNPS_OID}",
                "value": _NATIONAL_PREFIX[kind] + value,
            }
        ]
        # An IDNPS says which number it carries (8 + RPPS, 0 + ADELI): the same person sent once by
        # RPPS and once by IDNPS gets the same identifiers, so one Practitioner
        national = out[0]["value"]
        if kind == "RPPS" or (kind == "IDNPS" and _IDNPS_RPPS.fullmatch(national)):
            out.insert(0, {"type": _fr_type("RPPS"), "system": RPPS_SYSTEM, "value": national[1:]})
        elif kind == "ADELI" or (kind == "IDNPS" and _IDNPS_ADELI.fullmatch(national)):
            # FR Core 2.1.0 gives ADELI no system: typed, and none invented
            out.append({"type": _fr_type("ADELI"), "value": national[1:]})
        for national in out:
            _assigner(national, assigner)
        return out
    system, authority = _namespaced(ctx, ctx.kind or "practitioner", (".9.1", ".9.2", ".9.3"), ctx.here(".9"))
    ident: dict[str, Any] = {"system": system, "value": ctx.take(".1")}
    if kind:
        ident["type"] = _identifier_type(ctx.take(".13"))
    _assigner(ident, authority)
    return [ident]


# The national practitioner id (IDNPS) is the number behind a prefix saying which it is.
_NATIONAL_PREFIX = {"IDNPS": "", "RPPS": "8", "ADELI": "0"}
_IDNPS_RPPS = re.compile(r"8\d{11}")  # 8 + an RPPS number (11 digits)
_IDNPS_ADELI = re.compile(r"0\d{9}")  # 0 + an ADELI number (9 digits)


def _fr_type(code: str) -> dict[str, Any]:
    return {"coding": [{"system": FR_CS_0203, "code": code}]}


def human_name(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current XCN's name (XCN-2 family, -3 given, -4 further given, -5 suffix, -6 prefix)."""
    name: dict[str, Any] = {}
    _keep(ctx, name, "family", ".2.1")
    given: dict[str, Any] = {}
    _keep(ctx, given, "first", ".3")
    _keep(ctx, given, "further", ".4")
    if given:
        name["given"] = list(given.values())
    for key, path in (("prefix", ".6"), ("suffix", ".5")):
        part: dict[str, Any] = {}
        _keep(ctx, part, key, path)
        if part:
            name[key] = [part[key]]
    uses = ctx.concept_maps.get("pam-name-use")
    if name and uses is not None and ctx.read(".10") in uses:
        name["use"] = uses[ctx.take(".10")]
    return name or None


FINESS_SYSTEM = "https://finess.esante.gouv.fr"
URI_SYSTEM = "urn:ietf:rfc:3986"
# HD-3 as IHE France uses it: M = FINESS of the legal entity (EJ), N = of the site (EG).
_FINESS_KINDS = {"M": "FINEJ", "N": "FINEG"}


def _hd_identifier(ctx: Context, uid_path: str, kind_path: str) -> dict[str, Any] | None:
    uid, kind = ctx.read(uid_path), ctx.read(kind_path)
    if not uid:
        return None
    if kind in _FINESS_KINDS:
        ctx.take(uid_path)
        ctx.take(kind_path)
        return {
            "use": "official",
            "type": {"coding": [{"system": FR_CS_0203, "code": _FINESS_KINDS[kind]}]},
            "system": FINESS_SYSTEM,
            "value": uid,
        }
    if kind == "ISO" and is_oid(uid):
        ctx.take(uid_path)
        ctx.take(kind_path)
        return {"system": URI_SYSTEM, "value": f"urn:oid:{uid}"}
    return None  # a local namespace identifies nothing outside the sender


def hd_organization_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current HD (MSH-4, inside a 'scope') → the FR Core Organization identifier: FINESS
    EJ/EG (HD-3 M/N) in the ``finess`` slice, an OID as a URI; a local name gives none."""
    return _hd_identifier(ctx, ".2", ".3")


def pl_facility_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The facility (PL-4, an HD) of the current location → Organization identifier, as above."""
    return _hd_identifier(ctx, ".4.2", ".4.3")


def decimal(ctx: Context, value: Any) -> float | int | None:
    """An NM field → a JSON number; anything else is reported and left out."""
    number = _number(str(value or ""))
    if number is None and value:
        ctx.degrade(f"{ctx.place()}: not a number JSON keeps exactly; left out")
    return number


def positive_int(ctx: Context, value: Any) -> int | None:
    """An NM field → a FHIR positiveInt (1 … 2^31-1, no fraction); anything else is reported."""
    number = _number(str(value or ""))
    if isinstance(number, int) and 0 < number <= _POSITIVE_INT_MAX:
        return number
    if value:
        ctx.degrade(f"{ctx.place()}: not a whole number from 1 to {_POSITIVE_INT_MAX}; left out")
    return None


PASSERELLE_SEGMENT = "urn:passerelle:hl7v2-segment:"


def _segment_extension(name: str) -> Function:
    def keep(ctx: Context, _: Any) -> dict[str, Any] | None:
        """Every non-empty field of the segment as a sub-extension: kept whole, never dropped."""
        segment = ctx.message.segment(name)
        if segment is None:
            return None
        parts = []
        for n in range(1, len(segment) + 1):
            if segment.field(n).strip() and segment.field(n) != NULL:
                parts.append({"url": f"{name}-{n}", "valueString": ctx.take_field(name, 1, n)})
        return {"url": PASSERELLE_SEGMENT + name, "extension": parts} if parts else None

    return keep


BUILTIN: dict[str, Function] = {
    # PAM FR Z segments whose FHIR form FR Core does not fix: kept field by field (raw ER7).
    "zfa_extension": _segment_extension("ZFA"),
    "zfd_extension": _segment_extension("ZFD"),
    "decimal": decimal,
    "merged_identifier": merged_identifier,
    "ins_profile": ins_profile,
    "positive_int": positive_int,
    "practitioner_identifier": practitioner_identifier,
    "human_name": human_name,
    "hd_organization_identifier": hd_organization_identifier,
    "pl_facility_identifier": pl_facility_identifier,
    "hl7_instant": hl7_instant,
    "cwe_concept": cwe_concept,
    "obx_value": obx_value,
    "reference_range": reference_range,
    "interpretation": interpretation,
    "observation_identifier": observation_identifier,
    "order_identifier": order_identifier,
    "oid_system": oid_system,
    "hl7_date": hl7_date,
    "birth_time": birth_time,
    "hl7_datetime": hl7_datetime,
    "cx_identifier": cx_identifier,
    "pid_identifier": cx_identifier,  # the earlier name of cx_identifier (kind patient)
    "ei_identifier": ei_identifier,
    "eip_identifiers": eip_identifiers,
    "identity_reliability": identity_reliability,
    "immunization_identifier": immunization_identifier,
    "annotation": annotation,
    "appointment_notes": appointment_notes,
    "place_text": place_text,
    "birth_place": birth_place,
    "given_names": given_names,
    "telecom": telecom,
    "address": address,
}
