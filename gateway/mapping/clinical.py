"""Mapping functions for the clinical and administrative segments of the ADT feed (mappings/segments.yaml):
NK1 and GT1 (RelatedPerson), IN1 (Coverage and its insurer), AL1 and IAM (AllergyIntolerance), DG1
(Condition), PR1 (Procedure), OBX (Observation), ROL (CareTeam), and the places of PV1 and ZBE
(Location, and the Encounter's ``location`` entries).

**Keys.** Every resource is written under a namespaced identifier (docs/mappings.md, "Identity,
ownership and loss"). Where the segment carries a business identifier (DG1-20, PR1-19, IAM-7, ROL-1,
GT1-2, IN1-3, PL-10) it is namespaced by its assigning authority like any other. Most of these
segments carry none, so the key is scoped to what the segment belongs to, and never reaches across patients:

- scoped to the patient: ``urn:passerelle:patient:<patient system>:<patient value>:<kind>`` (the
  patient's own key, the one its Patient is written under: PI, else MR, PT, else the first
  namespaced PID-3), with the segment's set id as value (NK1-1, GT1-1, IN1-1). A replay writes the
  same keys again, so it updates rather than duplicates; another patient's NK1 1 is another key.
  An allergy (AL1, IAM) is keyed on its allergen (code ^ coding system): the same allergy keeps its
  key when the list is sent in another order. A care-team role (ROL) is keyed on its role and its
  person's number. A set id (or allergen, or role) that repeats within the message is replaced by
  the segment's place (``#n``) rather than merging two segments into one resource;
- scoped to the visit (``urn:passerelle:visit:…``, PV1-19's key), else to the patient: DG1 and PR1,
  so that diagnosis 1 of one stay never replaces diagnosis 1 of another;
- an ADT's OBX: per message and place (the sender, MSH-10 and the OBX set id), scoped to the
  patient, like ORU results without an order;
- a place (PV1-3, PV1-6, PV1-11): one Location per place, identified by its hierarchy within the
  facility (point of care ^ room ^ bed ^ building ^ floor) in the namespace of the location's
  assigning authority (PL-11), else its facility (PL-4), else the establishment that numbers the
  visit (PV1-19.4), else the sender's; a PAM FR unit (ZBE-7, ZBE-8) by its code (XON-10) in the
  namespace of XON-6, else the same fall-backs. A place whose namespace cannot be resolved is not
  created (a warning says so); the Encounter keeps it as a display text.

A segment whose key cannot be built (no namespaced patient identifier) produces no resource: its
leaves stay in the unmapped report.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

from gateway.core.errors import UnknownNamespace, UnsupportedMessage, ValidationError
from gateway.hl7 import path as er7_path
from gateway.hl7.er7 import unescape
from gateway.mapping.engine import NULL, Context, Leaf
from gateway.mapping.functions import (
    _keep,
    concept_at,
    cwe_concept,
    cx_identifier,
    ei_identifier,
    hl7_date,
    hl7_datetime,
    telecom,
)
from gateway.mapping.namespaces import Authority

Function = Callable[[Context, Any], Any]

PATIENT_SCOPE: Final = "urn:passerelle:patient:"
VISIT_SCOPE: Final = "urn:passerelle:visit:"
INSURER_SCOPE: Final = "urn:passerelle:insurer:"
V2_0063: Final = "http://terminology.hl7.org/CodeSystem/v2-0063"
V2_0131: Final = "http://terminology.hl7.org/CodeSystem/v2-0131"
RELATIONSHIP_MAP: Final = "hl7-0063-relationship"
CONTACT_ROLE_MAP: Final = "hl7-0131-contact-role"
FR_ROLE_MAP: Final = "pam-contact-role-fr"
NAME_USE_MAP: Final = "pam-name-use"
LOCATION_PHYSICAL_TYPE: Final = "http://terminology.hl7.org/CodeSystem/location-physical-type"
ALTERNATE_CODES: Final = "http://hl7.org/fhir/StructureDefinition/alternate-codes"
# PV2-8 / PV2-9 (HL7 V2-to-FHIR, "Segment PV2 to Encounter"): the R5 elements as R4 extensions;
# PV2-9 also as FR Core's estimated discharge date (a date).
PLANNED_START: Final = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Encounter.plannedStartDate"
PLANNED_END: Final = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Encounter.plannedEndDate"
FR_ESTIMATED_DISCHARGE: Final = (
    "https://hl7.fr/ig/fhir/core/StructureDefinition/fr-core-estimated-discharge-date"
)
MODE_OF_ARRIVAL: Final = "http://hl7.org/fhir/StructureDefinition/encounter-modeOfArrival"
XHTML: Final = "http://www.w3.org/1999/xhtml"

Key = tuple[str, str]  # (system, value) of the identifier a resource is written under


# -- keys -----------------------------------------------------------------------------------------


def _part(text: str) -> str:
    """A value inside a derived URN: letters, digits and ``-._~`` kept, the rest percent-encoded."""
    return quote(text, safe="-._~")


# Characters a FHIR search token escapes, and the separator of a place's parts: percent-encoded in
# a key value built from the message's text.
_KEY_ESCAPES: Final = {",": "%2C", "|": "%7C", "$": "%24", "\\": "%5C", "^": "%5E", "%": "%25"}


def _key_part(text: str) -> str:
    return "".join(_KEY_ESCAPES.get(ch, ch) for ch in text)


def _scoped(scope: str, key: Key, kind: str) -> str:
    """The system of what is keyed within ``key``: the key's system as it is, its value encoded
    (no ``:`` left in it), then the kind; read from the right, it cannot be mistaken for another."""
    return f"{scope}{key[0]}:{_part(key[1])}:{kind}"


def _quietly(ctx: Context, build: Callable[[], Any]) -> tuple[Any, set[Leaf]]:
    """``build()`` without making what it takes count for the resource being built: the leaves it
    took are returned, for the caller to consume where the value really goes."""
    saved, saved_kind = ctx.consumed, ctx.kind
    taken: set[Leaf] = set()
    ctx.consumed = taken
    try:
        return build(), taken
    finally:
        ctx.consumed, ctx.kind = saved, saved_kind


def _cx_identifiers(ctx: Context, seg: str, occ: int, fld: int, kind: str) -> list[dict[str, Any]]:
    """The namespaced identifiers of a CX field, as ``cx_identifier`` builds them (nothing consumed;
    an identifier whose namespace cannot be resolved is skipped)."""
    out: list[dict[str, Any]] = []
    for n, rep in enumerate(ctx.message.repetitions(f"{seg}[{occ}]-{fld}"), 1):
        if not rep.strip():
            continue
        saved = ctx.scoped(seg, occ, fld, n, rep)

        def one() -> dict[str, Any] | None:
            ctx.kind = kind
            try:
                return cx_identifier(ctx, None)
            except UnknownNamespace:
                return None

        try:
            ident, _ = _quietly(ctx, one)
        finally:
            ctx.restore(saved)
        if isinstance(ident, dict) and ident.get("system") and ident.get("value"):
            out.append(ident)
    return out


def _preferred(idents: list[dict[str, Any]], types: tuple[str, ...]) -> Key | None:
    """The key the engine writes a resource under: the first identifier of a preferred type, else
    the first (engine ``_key``)."""
    for code in types:
        for ident in idents:
            codings = (ident.get("type") or {}).get("coding") or []
            if any(isinstance(c, dict) and c.get("code") == code for c in codings):
                return str(ident["system"]), str(ident["value"])
    return (str(idents[0]["system"]), str(idents[0]["value"])) if idents else None


def patient_key(ctx: Context) -> Key | None:
    """The key of the patient mapped here (the one its Patient is written under), or None."""
    occ = ctx.occurrence("PID") or 1
    memo = ("clinical:patient", occ)
    if memo not in ctx.memo:
        ctx.memo[memo] = _preferred(_cx_identifiers(ctx, "PID", occ, 3, "patient"), ("PI", "MR", "PT"))
    found: Key | None = ctx.memo[memo]
    return found


def visit_key(ctx: Context) -> Key | None:
    """The key of the visit (PV1-19, as the visit Encounter is written), or None."""
    occ = ctx.occurrence("PV1") or 1
    memo = ("clinical:visit", occ)
    if memo not in ctx.memo:
        ctx.memo[memo] = _preferred(_cx_identifiers(ctx, "PV1", occ, 19, "visit"), ("VN",))
    found: Key | None = ctx.memo[memo]
    return found


def _label(seg: str, occ: int) -> str:
    return f"{seg}[{occ}]" if occ > 1 else seg


def _set_id(ctx: Context, seg: str, occ: int) -> tuple[str, bool]:
    """The segment's set id when it is unique among the message's segments of that name (True),
    else its place ``#n`` (False)."""
    own = ctx.read(f"{seg}[{occ}]-1").strip()
    if own:
        count = len(ctx.message.segments_named(seg))
        same = sum(1 for n in range(1, count + 1) if ctx.read(f"{seg}[{n}]-1").strip() == own)
        if same == 1:
            return own, True
    return f"#{occ}", False


def _unique_or_place(ctx: Context, seg: str, occ: int, value: Callable[[int], str]) -> str:
    """``value(occ)`` when no other segment of that name gives the same, else the place ``#n``."""
    own = value(occ)
    count = len(ctx.message.segments_named(seg))
    if own and all(value(n) != own for n in range(1, count + 1) if n != occ):
        return own
    return f"#{occ}"


def _scoped_identifier(ctx: Context, scope: str, key: Key | None, what: str) -> dict[str, Any] | None:
    if ctx.segment is None:
        return None
    seg, occ = ctx.segment
    if key is None:
        ctx.warnings.append(
            f"{_label(seg, occ)}: no namespaced {what} identifier to key it on; not mapped "
            "(in the unmapped report)"
        )
        return None
    value, is_set_id = _set_id(ctx, seg, occ)
    if is_set_id:
        ctx.take(f"{seg}[{occ}]-1")
    return {"system": _scoped(scope, key, ctx.kind or seg.lower()), "value": value}


def patient_scoped_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current segment's key within its patient (``kind:`` names what it is): its set id."""
    return _scoped_identifier(ctx, PATIENT_SCOPE, patient_key(ctx), "patient")


def relative_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """A relative the PID itself names (PID-21, the mother): one per patient and role (``kind:``)."""
    key = patient_key(ctx)
    if key is None:
        return None
    return {"system": _scoped(PATIENT_SCOPE, key, ctx.kind or "relative"), "value": "1"}


def visit_scoped_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current segment's key within its visit (PV1-19), else within its patient: its set id."""
    key = visit_key(ctx)
    if key is not None:
        return _scoped_identifier(ctx, VISIT_SCOPE, key, "visit")
    return _scoped_identifier(ctx, PATIENT_SCOPE, patient_key(ctx), "patient")


def _within_patient(
    key_of: Callable[[Context, str, int, Key], dict[str, Any] | None],
) -> Function:
    """A keying function for the current segment within its patient: ``key_of(ctx, segment,
    occurrence, patient key)``; outside a segment none, for a patient without key the unkeyed form."""

    def keyed(ctx: Context, _: Any) -> dict[str, Any] | None:
        if ctx.segment is None:
            return None
        seg, occ = ctx.segment
        key = patient_key(ctx)
        if key is None:
            return _scoped_identifier(ctx, PATIENT_SCOPE, None, "patient")
        return key_of(ctx, seg, occ, key)

    keyed.__doc__ = key_of.__doc__
    return keyed


def _allergy_key(ctx: Context, seg: str, occ: int, key: Key) -> dict[str, Any] | None:
    """An allergy (AL1, IAM) within its patient, keyed on its allergen (field 3: code ^ coding
    system), else on its set id."""

    def allergen(n: int) -> str:
        code = ctx.read(f"{seg}[{n}]-3.1").strip()
        return f"{code}^{ctx.read(f'{seg}[{n}]-3.3').strip()}" if code else ""

    value = _unique_or_place(ctx, seg, occ, allergen)
    if value.startswith("#"):  # no allergen, or one sent twice: the set id, else the place
        return _scoped_identifier(ctx, PATIENT_SCOPE, key, "patient")
    return {"system": _scoped(PATIENT_SCOPE, key, ctx.kind or "allergy"), "value": value}


def _care_team_key(ctx: Context, seg: str, occ: int, key: Key) -> dict[str, Any] | None:
    """A ROL within its patient: its role (ROL-3.1) and its person's number (ROL-4.1 and its
    authority), else its place."""

    def role(n: int) -> str:
        person = ctx.read(f"{seg}[{n}]-4.1").strip()
        if not person:
            return ""
        authority = ctx.read(f"{seg}[{n}]-4.9.2").strip() or ctx.read(f"{seg}[{n}]-4.9.1").strip()
        return "^".join((ctx.read(f"{seg}[{n}]-3.1").strip(), person, authority))

    value = _unique_or_place(ctx, seg, occ, role)
    return {"system": _scoped(PATIENT_SCOPE, key, ctx.kind or "care-team"), "value": value}


def _message_observation_key(ctx: Context, seg: str, occ: int, key: Key) -> dict[str, Any] | None:
    """An OBX of a message without orders (ADT): per message (sender, MSH-10) and OBX set id (else
    its place), within the patient; a replay writes it again, another message never does."""
    application, facility, facility_id = ctx.sender()
    set_id, is_set_id = _set_id(ctx, seg, occ)
    if is_set_id:
        ctx.take(f"{seg}[{occ}]-1")
    value = "^".join((application, facility or facility_id, ctx.message.control_id, set_id))
    return {"system": _scoped(PATIENT_SCOPE, key, ctx.kind or "observation"), "value": value}


allergy_identifier = _within_patient(_allergy_key)
care_team_identifier = _within_patient(_care_team_key)
message_observation_identifier = _within_patient(_message_observation_key)


def optional_cx_identifier(ctx: Context, value: Any) -> dict[str, Any] | None:
    """``cx_identifier`` for an identifier the resource is not keyed on (GT1-2, IN1-3): one whose
    namespace cannot be resolved is left in the unmapped report, with a warning, rather than refusing
    the message."""
    try:
        return cx_identifier(ctx, value)
    except UnknownNamespace as exc:
        ctx.warnings.append(f"{exc.message}; this identifier left out (in the unmapped report)")
        return None


def optional_ei_identifier(ctx: Context, value: Any) -> dict[str, Any] | None:
    """``ei_identifier`` for a business identifier a scoped key backs up (DG1-20, PR1-19, IAM-7,
    ROL-1): one whose namespace cannot be resolved is left in the unmapped report, with a warning."""
    try:
        return ei_identifier(ctx, value)
    except UnknownNamespace as exc:
        ctx.warnings.append(f"{exc.message}; this identifier left out (in the unmapped report)")
        return None


def insurer_scoped_identifier(ctx: Context, value: Any) -> dict[str, Any] | None:
    """A number the insurer assigns (IN1-36 policy, IN1-8 group; ``kind:`` says which) in the
    insurer's namespace (IN1-3); without a namespaced insurer it is left in the unmapped report."""
    text = str(value or "").strip()
    if not text or ctx.segment is None:
        return None
    seg, occ = ctx.segment
    insurers = _cx_identifiers(ctx, seg, occ, 3, "insurer")
    if not insurers:
        ctx.warnings.append(f"{ctx.place()}: no namespaced insurer (IN1-3) to key it on; left out")
        return None
    key = (str(insurers[0]["system"]), str(insurers[0]["value"]))
    return {"system": _scoped(INSURER_SCOPE, key, ctx.kind or "policy"), "value": text}


# -- places --------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Place:
    """A place's key (and what of the message the key carries: consumed by its Location)."""

    identifier: dict[str, Any]
    leaves: set[Leaf] = field(default_factory=set)


# PL components (point of care, room, bed, building, floor) in ER7 order, for the place's value,
# and its physical type from its most precise part (HL7 V2-to-FHIR "PL[Location]": room ro, bed bd,
# building bu, floor lvl; the point of care has none there).
_PL_PARTS: Final = (1, 2, 3, 7, 8)
_PHYSICAL_TYPES: Final = ((3, "bd", "Bed"), (2, "ro", "Room"), (8, "lvl", "Level"), (7, "bu", "Building"))
# Hierarchy within the facility, outermost first: building, floor, point of care, room, bed.
_PL_HIERARCHY: Final = (7, 8, 1, 2, 3)


def _parts(ctx: Context, seg: str, occ: int, fld: int) -> list[list[str]]:
    """The first repetition of a field, split into components and subcomponents, unescaped (HL7's
    null as empty); split once per message."""
    memo = ("clinical:parts", seg, occ, fld)
    found: list[list[str]] | None = ctx.memo.get(memo)
    if found is None:
        segment = ctx.find(seg, occ)
        raw = segment.field(fld) if segment is not None else ""
        msg = ctx.message
        seps = msg.separators
        first = raw.split(seps.repetition, 1)[0] if raw else ""
        found = []
        for comp in first.split(seps.component) if first else ():
            found.append(
                [
                    ""
                    if sub == NULL
                    else (unescape(sub, seps, msg.codec) if seps.escape in sub else sub).strip()
                    for sub in comp.split(seps.subcomponent)
                ]
            )
        ctx.memo[memo] = found
    return found


def _at(parts: list[list[str]], comp: int, sub: int = 1) -> str:
    if comp > len(parts):
        return ""
    subs = parts[comp - 1]
    return subs[sub - 1] if sub <= len(subs) else ""


def _hd(parts: list[list[str]], comp: int) -> Authority:
    """The HD held in component ``comp`` (its subcomponents)."""
    return Authority(_at(parts, comp, 1), _at(parts, comp, 2), _at(parts, comp, 3))


def _namespace(
    ctx: Context, candidates: list[tuple[Authority, str | None]], where: str
) -> tuple[str, str, set[Leaf]] | None:
    """(system, assigner name, leaves the system carries) for a place, from the first candidate
    authority sent (with the path of its HD when its leaves are the place's own), else the
    sender's namespace; None (with a warning) when the channel can resolve none."""
    authority, base = Authority(), None
    for candidate, path in candidates:
        if candidate:
            authority, base = candidate, path
            break
    try:
        resolved = ctx.resolve("location", authority, where)
    except UnknownNamespace:
        ctx.warnings.append(
            f"{where}: no namespace for this place (assigning authority {authority.describe()}); "
            "no Location created (declare one in namespaces of config.yaml)"
        )
        return None
    leaves: set[Leaf] = set()
    assigner = ""
    if base is not None:
        text, leaf = ctx.value(f"{base}.1")
        if text and leaf is not None:
            leaves.add(leaf)
            assigner = text
        for part, sub in (("universal", 2), ("type", 3)):
            text, leaf = ctx.value(f"{base}.{sub}")
            if part in resolved.used and text and leaf is not None:
                leaves.add(leaf)
    return resolved.system, assigner, leaves


def _visit_authority(ctx: Context) -> Authority:
    """The assigning authority of the visit number (PV1-19.4): the establishment that numbers it."""
    return _hd(_parts(ctx, "PV1", ctx.occurrence("PV1") or 1, 19), 4)


def _place_key(ctx: Context, seg: str, occ: int, fld: int) -> _Place | None:
    """The key of the place a PL field names (its first repetition), or None; worked out once."""
    memo = ("clinical:place", seg, occ, fld)
    if memo in ctx.memo:
        found: _Place | None = ctx.memo[memo]
        return found
    place: _Place | None = None
    pl = _parts(ctx, seg, occ, fld)
    parts = [_at(pl, c) for c in _PL_PARTS]
    comprehensive = _at(pl, 10)
    if comprehensive or any(parts):
        base = f"{seg}[{occ}]-{fld}"
        where = er7_path.field_path(seg, occ, fld) + "[1]"
        if comprehensive:
            ei = Authority(_at(pl, 10, 2), _at(pl, 10, 3), _at(pl, 10, 4))
            found_ns = _namespace(ctx, [(ei, f"{base}.10.2")], f"{where}.10")
            value = comprehensive
        else:
            candidates = [
                (_hd(pl, 11), f"{base}.11"),
                (_hd(pl, 4), f"{base}.4"),
                (_visit_authority(ctx), None),
            ]
            found_ns = _namespace(ctx, candidates, f"{where}.4")
            value = "^".join(_key_part(p) for p in parts).rstrip("^")
        if found_ns is not None:
            system, assigner, leaves = found_ns
            ident: dict[str, Any] = {"system": system, "value": value}
            if assigner:
                ident["assigner"] = {"display": assigner}
            if comprehensive:
                leaves.add((seg, occ, fld, 1, 10, 1))
            place = _Place(ident, leaves)
    ctx.memo[memo] = place
    return place


def _unit_key(ctx: Context, seg: str, occ: int, fld: int) -> _Place | None:
    """The key of a unit an XON field names (PAM FR ZBE-7/8: XON-10 the UF code), or None."""
    memo = ("clinical:unit", seg, occ, fld)
    if memo in ctx.memo:
        found: _Place | None = ctx.memo[memo]
        return found
    place: _Place | None = None
    xon = _parts(ctx, seg, occ, fld)
    code = _at(xon, 10)
    if code:
        base = f"{seg}[{occ}]-{fld}"
        where = er7_path.field_path(seg, occ, fld) + "[1]"
        candidates = [(_hd(xon, 6), f"{base}.6"), (_visit_authority(ctx), None)]
        found_ns = _namespace(ctx, candidates, f"{where}.6")
        if found_ns is not None:
            system, assigner, leaves = found_ns
            ident: dict[str, Any] = {"system": system, "value": code}
            kind = _at(xon, 7)
            if kind:
                ident["type"] = {"text": kind}
                leaves.add((seg, occ, fld, 1, 7, 1))
            if assigner:
                ident["assigner"] = {"display": assigner}
            leaves.add((seg, occ, fld, 1, 10, 1))
            place = _Place(ident, leaves)
    ctx.memo[memo] = place
    return place


def _here(ctx: Context) -> tuple[str, int, int] | None:
    if ctx.at is None:
        return None
    seg, occ, fld, _ = ctx.at
    return seg, occ, fld


def location_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current PL (a Location's ``scope``) → the place's namespaced identifier."""
    at = _here(ctx)
    place = _place_key(ctx, *at) if at is not None else None
    if place is None:
        return None
    ctx.consumed.update(place.leaves)
    return dict(place.identifier)


def unit_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current XON (a Location's ``scope``: ZBE-7, ZBE-8) → the unit's namespaced identifier."""
    at = _here(ctx)
    place = _unit_key(ctx, *at) if at is not None else None
    if place is None:
        return None
    ctx.consumed.update(place.leaves)
    return dict(place.identifier)


def _place_parts(ctx: Context, seg: str, occ: int, fld: int) -> list[tuple[int, str]]:
    """The parts of a place, outermost first: (component, text)."""
    pl = _parts(ctx, seg, occ, fld)
    return [(c, text) for c in _PL_HIERARCHY if (text := _at(pl, c))]


def place_details(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current PL → the Location's name (its hierarchy, outermost first), physical type and
    description (PL-9)."""
    at = _here(ctx)
    if at is None:
        return None
    seg, occ, fld = at
    parts = _place_parts(ctx, seg, occ, fld)
    if not parts:
        return None
    base = f"{seg}[{occ}]-{fld}"
    out: dict[str, Any] = {
        "name": " / ".join(ctx.take(f"{base}.{c}.1") for c, _ in parts),
        "mode": "instance",
    }
    present = {c for c, _ in parts}
    for component, code, display in _PHYSICAL_TYPES:
        if component in present:
            out["physicalType"] = {
                "coding": [{"system": LOCATION_PHYSICAL_TYPE, "code": code, "display": display}]
            }
            break
    if _at(_parts(ctx, seg, occ, fld), 9):
        out["description"] = ctx.take(f"{base}.9")
    return out


def _entry(
    ctx: Context, key: str, place: _Place | None, display: str, status: str, start: bool
) -> dict[str, Any] | None:
    entry: dict[str, Any] = {}
    ref = _own(ctx, key) if place is not None else None  # one per PV1 group in an A45: this one's
    if ref:
        entry["location"] = ref
    if display:
        entry.setdefault("location", {})["display"] = display
    if not entry:
        return None
    entry["status"] = status
    moment = _movement_time(ctx) if start else None
    if moment:
        entry["period"] = {"start": moment}
    return entry


def _movement_time(ctx: Context) -> str | None:
    """ZBE-2, the time of the movement (PAM FR), as FHIR; read once per message."""
    memo = ("clinical:movement-time",)
    if memo not in ctx.memo:
        text = ctx.read("ZBE-2")
        ctx.memo[memo] = hl7_datetime(ctx, text) if text else None
    found: str | None = ctx.memo[memo]
    return found


def _pl_entry(
    ctx: Context, key: str, fld: int, status: str, start: bool, seg: str = "PV1"
) -> dict[str, Any] | None:
    occ = ctx.occurrence(seg)
    if occ is None or not _parts(ctx, seg, occ, fld):
        return None
    place = _place_key(ctx, seg, occ, fld)
    display = " / ".join(text for _, text in _place_parts(ctx, seg, occ, fld))
    return _entry(ctx, key, place, display, status, start)


# The pending events (HL7 v2 chapter 3; PAM FR "mouvements prévisionnels") and the triggers that
# cancel them: admit A14 / A27, transfer A15 / A26, discharge A16 / A25.
PENDING_ADMIT: Final = "A14"
PENDING_TRANSFER: Final = "A15"
# A cancelled pending admit or transfer withdraws the place the patient was to go to.
_WITHDRAWN_PLACES: Final = frozenset({"A26", "A27"})


def trigger(ctx: Context) -> str:
    """MSH-9.2, the trigger event (a header field: reading it maps nothing)."""
    return ctx.read("MSH-9.2").strip()


def location_assigned(ctx: Context, _: Any) -> dict[str, Any] | None:
    """PV1-3 → an Encounter.location entry (V2-to-FHIR "PV1[Encounter]": active, planned when PV1-2
    is P, and on a pending admit (A14), whose place is where the patient is to be admitted),
    referring to its Location, from the movement's time (ZBE-2)."""
    planned = ctx.read("PV1-2.1") == "P" or trigger(ctx) == PENDING_ADMIT
    return _pl_entry(ctx, "assigned_location", 3, "planned" if planned else "active", True)


def location_prior(ctx: Context, _: Any) -> dict[str, Any] | None:
    """PV1-6 → an Encounter.location entry, completed (V2-to-FHIR "PV1[Encounter]")."""
    return _pl_entry(ctx, "prior_location", 6, "completed", False)


def location_temporary(ctx: Context, _: Any) -> dict[str, Any] | None:
    """PV1-11 → an Encounter.location entry, active (V2-to-FHIR "PV1[Encounter]")."""
    return _pl_entry(ctx, "temporary_location", 11, "active", False)


def location_pending(ctx: Context, _: Any) -> dict[str, Any] | None:
    """PV1-42 (pending location) → an Encounter.location entry: reserved, as V2-to-FHIR
    "PV1[Encounter]" says of the field; planned on a pending transfer (A15), which announces that
    the patient is to be moved there (FHIR R4's definition of planned). A cancelled pending admit or
    transfer (A27, A26) withdraws it: no entry (the place stays a Location)."""
    event = trigger(ctx)
    if event in _WITHDRAWN_PLACES:
        return None
    status = "planned" if event == PENDING_TRANSFER else "reserved"
    return _pl_entry(ctx, "pending_location", 42, status, False)


def location_prior_temporary(ctx: Context, _: Any) -> dict[str, Any] | None:
    """PV1-43 (prior temporary location) → an Encounter.location entry, completed (V2-to-FHIR)."""
    return _pl_entry(ctx, "prior_temporary_location", 43, "completed", False)


def location_prior_pending(ctx: Context, _: Any) -> dict[str, Any] | None:
    """PV2-1 (prior pending location) → an Encounter.location entry, planned (V2-to-FHIR
    "PV2[Encounter]"); none on A26/A27, which withdraw the pending place."""
    if trigger(ctx) in _WITHDRAWN_PLACES:
        return None
    return _pl_entry(ctx, "prior_pending_location", 1, "planned", False, seg="PV2")


def _unit_entry(ctx: Context, key: str, fld: int) -> dict[str, Any] | None:
    occ = ctx.occurrence("ZBE")
    if occ is None or not _parts(ctx, "ZBE", occ, fld):
        return None
    place = _unit_key(ctx, "ZBE", occ, fld)
    display = _at(_parts(ctx, "ZBE", occ, fld), 1)
    return _entry(ctx, key, place, display, "active", True)


def location_medical_unit(ctx: Context, _: Any) -> dict[str, Any] | None:
    """ZBE-7 (PAM FR: the medical responsibility unit) → an Encounter.location entry."""
    return _unit_entry(ctx, "medical_unit", 7)


def location_care_unit(ctx: Context, _: Any) -> dict[str, Any] | None:
    """ZBE-8 (PAM FR: the care responsibility unit) → an Encounter.location entry."""
    return _unit_entry(ctx, "care_unit", 8)


# -- events PAM FR defines otherwise, moves ---------------------------------------------------------


def declares_pam_fr(ctx: Context) -> bool:
    """Whether the message comes from a French sender that follows PAM FR: MSH-12 ``2.5^FRA^…``,
    MSH-17 FRA, an IHE_FRANCE profile in MSH-21, or a PAM FR movement segment (ZBE)."""
    memo = ("clinical:pam-fr",)
    if memo not in ctx.memo:
        msg = ctx.message
        ctx.memo[memo] = (
            ctx.read("MSH-12.2.1").strip().upper() == "FRA"
            or ctx.read("MSH-17.1").strip().upper() == "FRA"
            or any("IHE_FRANCE" in rep.upper() for rep in msg.repetitions("MSH-21"))
            or bool(msg.segments_named("ZBE"))
        )
    found: bool = ctx.memo[memo]
    return found


def pam_fr_trigger_check(ctx: Context, _: Any) -> None:
    """Refuses, as a type not mapped (AR, ERR-3 200), a trigger PAM FR does not use when the sender
    declares PAM FR: A08 (identity updates come as A31, visit and movement corrections as Z99). Other
    senders' A08 is mapped as V2-to-FHIR says. Sets nothing."""
    if trigger(ctx) == "A08" and declares_pam_fr(ctx):
        raise UnsupportedMessage(
            "ADT^A08 is not mapped for a PAM FR sender: PAM FR does not use A08 (identity updates "
            "come as A31, visit and movement corrections as Z99)",
            location="MSH-9",
        )


def prior_visit_identifier(ctx: Context, value: Any) -> dict[str, Any] | None:
    """The current MRG-5 repetition of an A45 (the visit that moves) → its namespaced identifier,
    the key the visit is found by. A45 moves a visit between accounts; when MRG-1 names a patient
    other than PID-3, it would also move the visit to another patient, which the gateway never does
    (identity safety: the repository refuses to move a record between patients): the message is
    refused, naming MRG-1. A prior patient named in no namespace PID-3 shares cannot be told to be
    the same one: refused too."""
    occ = ctx.occurrence("MRG") or 1
    prior = _cx_identifiers(ctx, "MRG", occ, 1, "patient")
    named = any(rep.strip() for rep in ctx.message.repetitions(f"MRG[{occ}]-1"))
    if named:
        current = {
            (str(i["system"]), str(i["value"]))
            for i in _cx_identifiers(ctx, "PID", ctx.occurrence("PID") or 1, 3, "patient")
        }
        if not any((str(i["system"]), str(i["value"])) in current for i in prior):
            raise ValidationError(
                "A45 moves this visit from the patient of MRG-1 to another patient (PID-3): the "
                "gateway never moves a visit between patients (a merge, A40, or a correction at "
                "the source is needed)",
                location=er7_path.field_path("MRG", occ, 1),
            )
    return cx_identifier(ctx, value)


# -- people ---------------------------------------------------------------------------------------


def xpn_name(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current XPN → HumanName: family (XPN-1.1), given names (XPN-2, XPN-3), suffix (XPN-4,
    XPN-6), prefix (XPN-5), use (XPN-7, as the Patient's names)."""
    name: dict[str, Any] = {}
    _keep(ctx, name, "family", ".1.1")
    given: dict[str, Any] = {}
    _keep(ctx, given, "first", ".2")
    _keep(ctx, given, "further", ".3")
    if given:
        name["given"] = list(given.values())
    suffix: dict[str, Any] = {}
    _keep(ctx, suffix, "suffix", ".4")
    _keep(ctx, suffix, "degree", ".6")
    if suffix:
        name["suffix"] = list(suffix.values())
    prefix: dict[str, Any] = {}
    _keep(ctx, prefix, "prefix", ".5")
    if prefix:
        name["prefix"] = [prefix["prefix"]]
    if not name:
        return None
    uses = ctx.concept_maps.get(NAME_USE_MAP)
    if uses is not None and ctx.read(".7") in uses and uses[ctx.read(".7")]:
        name["use"] = uses[ctx.take(".7")]
    return name


def contact_point(ctx: Context, value: Any) -> dict[str, Any] | None:
    """``telecom`` for the current XTN; a use (XTN-2) it reads but overrides (a CP device is
    ``mobile``) is left in the unmapped report rather than counted as carried."""
    point = telecom(ctx, value)
    if point is None:
        return None
    use_code, leaf = ctx.value(".2")
    uses = ctx.concept_maps.get("hl7-0201-telecom-use")
    systems = ctx.concept_maps.get("hl7-0201-telecom-system")
    carried = {
        str(found)
        for table in (uses, systems)
        if table is not None and use_code in table
        for found in (table[use_code],)
    }
    if use_code and leaf is not None and not carried & {str(point.get("use")), str(point.get("system"))}:
        ctx.consumed.discard(leaf)
    return point


# Where a related person's date of birth is: NK1-16, GT1-8, IN1-18 (the insured's).
_BIRTH_DATES: Final = {"NK1": 16, "GT1": 8, "IN1": 18}


def birth_date(ctx: Context, _: Any) -> str | None:
    """The current segment's date of birth → ``birthDate``. A FHIR date holds no time: a birth time
    sent is left in the unmapped report (the Patient's own goes in patient-birthTime, whose context
    is Patient only)."""
    if ctx.segment is None or ctx.segment[0] not in _BIRTH_DATES:
        return None
    seg, occ = ctx.segment
    text, leaf = ctx.value(f"{seg}[{occ}]-{_BIRTH_DATES[seg]}")
    text = text.strip()
    if not text:
        return None
    day = hl7_date(ctx, text[:8]) if len(text) >= 4 else None
    if day and len(text) <= 8:
        ctx.consume(leaf)
    return day


def _table_concept(ctx: Context, table: str, system: str, names: tuple[str, ...]) -> dict[str, Any] | None:
    """The current CWE of an HL7 table: the code as sent in the table's system, its translation
    from concept map ``table``, and the FR Core role (TRE_R260) a v2-0131 role has; a code the map
    does not know is kept as sent, with a warning. A code of another coding system is kept as sent."""
    code = ctx.read(".1").strip()
    if not code or ctx.read(".3").strip() not in ("", *names):
        return cwe_concept(ctx, None)
    original: dict[str, Any] = {"system": system, "code": ctx.take(".1")}
    if ctx.read(".2").strip():
        original["display"] = ctx.take(".2")
    if ctx.read(".3").strip():
        ctx.take(".3")
    codings = [original]
    found = ctx.concept_maps.get(table)
    target = found.table.get(code) if found is not None else None
    if not isinstance(target, dict):
        ctx.degrade(
            f"{ctx.here('.1')}: code {code!r} not in concept map {table}; kept as sent ({system})", code="103"
        )
    else:
        if (target.get("system"), target.get("code")) != (system, code):
            codings.append(dict(target))
        roles = ctx.concept_maps.get(FR_ROLE_MAP)
        if roles is not None and target.get("system") == V2_0131:
            role = roles.table.get(str(target.get("code")))
            if isinstance(role, dict):
                codings.append(dict(role))
    concept: dict[str, Any] = {"coding": codings}
    if ctx.read(".9").strip():
        concept["text"] = ctx.take(".9")
    elif "display" in original:
        concept["text"] = original["display"]
    return concept


def relationship_concept(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current CWE of HL7 table 0063 (NK1-3, GT1-11, IN1-17) → a relationship: the v2 code kept,
    its V2-to-FHIR translation (v3 RoleCode, or v2-0131) and, for an emergency contact, the FR Core
    role ``personne à prévenir`` (TRE_R260 ECON)."""
    return _table_concept(ctx, RELATIONSHIP_MAP, V2_0063, ("HL70063", "0063"))


def contact_role(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current CWE of HL7 table 0131 (NK1-7, contact role) → a relationship: the v2-0131 code,
    and its FR Core role (TRE_R260): C emergency contact → ECON ``personne à prévenir en cas
    d'urgence``, N next of kin → NOK ``personne de confiance``."""
    return _table_concept(ctx, CONTACT_ROLE_MAP, V2_0131, ("HL70131", "0131"))


def _alternate_codes(ctx: Context, fld: int) -> dict[str, Any] | None:
    if ctx.segment is None:
        return None
    seg, occ = ctx.segment
    concept = concept_at(ctx, seg, occ, fld)
    if concept is None:
        return None
    return {"extension": [{"url": ALTERNATE_CODES, "valueCodeableConcept": concept}]}


def allergy_category_original(ctx: Context, _: Any) -> list[dict[str, Any]] | None:
    """AL1-2 / IAM-2 as sent, on ``category`` (V2-to-FHIR: the alternate-codes extension)."""
    found = _alternate_codes(ctx, 2)
    return [found] if found else None


def allergy_severity_original(ctx: Context, _: Any) -> dict[str, Any] | None:
    """AL1-4 / IAM-4 as sent, on ``criticality`` (V2-to-FHIR: the alternate-codes extension)."""
    return _alternate_codes(ctx, 4)


# -- allergy updates (IAM) ------------------------------------------------------------------------

ALLERGY_CLINICAL: Final = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
ALLERGY_VERIFICATION: Final = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
V2_0438: Final = "http://terminology.hl7.org/CodeSystem/v2-0438"
_STATUS_DISPLAYS: Final = {
    "active": "Active",
    "inactive": "Inactive",
    "resolved": "Resolved",
    "confirmed": "Confirmed",
    "unconfirmed": "Unconfirmed",
    "refuted": "Refuted",
    "entered-in-error": "Entered in Error",
}
CLINICAL_0438_MAP: Final = "hl7-0438-allergy-clinical"
VERIFICATION_0438_MAP: Final = "hl7-0438-allergy-verification"


def _status(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": _STATUS_DISPLAYS.get(code, code)}]}


def allergy_statuses(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current IAM → AllergyIntolerance ``clinicalStatus`` and ``verificationStatus``.

    IAM-6 D (delete, table 0206): V2-to-FHIR makes it an HTTP DELETE; the gateway never deletes
    clinical data, so the allergy is kept and marked ``entered-in-error`` (verification), without a
    clinical status (FHIR ait-2), as DG1-21 D is. Otherwise IAM-17 (table 0438, which mixes both
    axes) is translated: C confirmed, U/P/S unconfirmed, E entered-in-error, I inactive; the code
    as sent is kept beside the translation (v2-0438). V2-to-FHIR puts IAM-17 in clinicalStatus as
    sent, which FHIR's required binding does not admit. Without IAM-17 the allergy is active; a code
    the maps do not know is reported (a warning, the unmapped report) and the allergy stays active.
    """
    if ctx.segment is None:
        return None
    seg, occ = ctx.segment
    base = f"{seg}[{occ}]"
    if ctx.read(f"{base}-6.1").strip().upper() == "D":
        ctx.take(f"{base}-6.1")
        return {"verificationStatus": _status(ALLERGY_VERIFICATION, "entered-in-error")}
    code = ctx.read(f"{base}-17.1").strip()
    clinical_map = ctx.concept_maps.get(CLINICAL_0438_MAP)
    verification_map = ctx.concept_maps.get(VERIFICATION_0438_MAP)
    if not code or clinical_map is None or verification_map is None:
        return {"clinicalStatus": _status(ALLERGY_CLINICAL, "active")}
    if code not in clinical_map or code not in verification_map:
        ctx.degrade(
            f"{base}-17: code {code!r} not in concept map {CLINICAL_0438_MAP}; the allergy is kept active",
            code="103",
        )
        return {"clinicalStatus": _status(ALLERGY_CLINICAL, "active")}
    clinical, verification = clinical_map[code], verification_map[code]
    original: dict[str, Any] = {"system": V2_0438, "code": ctx.take(f"{base}-17.1")}
    if ctx.read(f"{base}-17.2").strip():
        original["display"] = ctx.take(f"{base}-17.2")
    if ctx.read(f"{base}-17.3").strip().upper() in ("HL70438", "0438"):
        ctx.take(f"{base}-17.3")
    out: dict[str, Any] = {}
    if clinical:
        out["clinicalStatus"] = _status(ALLERGY_CLINICAL, str(clinical))
    if verification:
        out["verificationStatus"] = _status(ALLERGY_VERIFICATION, str(verification))
    holder = out["verificationStatus" if verification else "clinicalStatus"]
    holder["coding"].append(original)
    return out


def cwe_codings(ctx: Context, value: Any) -> list[dict[str, Any]] | None:
    """The current CWE → its codings (to add to a CodeableConcept: IAM-27 to the allergen's code)."""
    concept = cwe_concept(ctx, value)
    codings = (concept or {}).get("coding") or []
    return list(codings) or None


def _own(ctx: Context, key: str) -> dict[str, str] | None:
    """The reference to this segment's resource ``key`` (one per segment), when the feed defines it
    and it was built."""
    if key not in ctx.refs:
        return None
    found = ctx.ref(key)
    one = (found[0] if len(found) == 1 else None) if isinstance(found, list) else found
    return dict(one) if one else None


def allergy_recorder(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current IAM → AllergyIntolerance.recorder. V2-to-FHIR: IAM-14 (reported by) is the
    recorder, the Patient when IAM-15 is SEL, a RelatedPerson for another relationship
    (``allergy_reporter``), else a name alone (not always a practitioner: a display, no resource).
    Without IAM-14, the person who first recorded it (IAM-23, ``allergy_recorder``), as Microsoft
    FHIR-Converter does."""
    if ctx.segment is None:
        return None
    seg, occ = ctx.segment
    relation = ctx.read(f"{seg}[{occ}]-15.1").strip()
    reps = ctx.message.repetitions(f"{seg}[{occ}]-14")
    reported = reps[0] if reps and reps[0].strip() else ""
    if relation.upper() == "SEL":
        return _own(ctx, "patient") if reported else None
    if relation:
        return _own(ctx, "allergy_reporter")
    if reported:
        saved = ctx.scoped(seg, occ, 14, 1, reported)
        try:
            name = person_display(ctx, None)
        finally:
            ctx.restore(saved)
        return {"display": name} if name else None
    return _own(ctx, "allergy_recorder")


def person_display(ctx: Context, _: Any) -> str | None:
    """The current XPN → a display name (given names, then the family name), for a person the
    message names without a number to key a resource on (IAM-14 without IAM-15)."""
    parts = [ctx.take(path) for path in (".5", ".2", ".3", ".1.1")]
    text = " ".join(p.strip() for p in parts if p.strip())
    return text or None


# -- visit (PV2) ----------------------------------------------------------------------------------


def planned_start(ctx: Context, value: Any) -> dict[str, Any] | None:
    """PV2-8 (expected admit) → the R5 Encounter.plannedStartDate as an R4 extension."""
    moment = hl7_datetime(ctx, value)
    return {"url": PLANNED_START, "valueDateTime": moment} if moment else None


def planned_end(ctx: Context, value: Any) -> list[dict[str, Any]] | None:
    """PV2-9 (expected discharge) → FR Core's estimated discharge date (a date) and the R5
    Encounter.plannedEndDate as an R4 extension (the time of day kept)."""
    moment = hl7_datetime(ctx, value)
    if not moment:
        return None
    day = hl7_date(ctx, str(value)[:8])
    out = [{"url": FR_ESTIMATED_DISCHARGE, "valueDate": day}] if day else []
    return [*out, {"url": PLANNED_END, "valueDateTime": moment}]


def visit_description(ctx: Context, _: Any) -> dict[str, Any] | None:
    """PV2-12 (visit description) → the Encounter's narrative (V2-to-FHIR: text.div). The leaf counts
    as mapped only when the narrative holds it as sent (no character to escape); otherwise it is
    also left in the unmapped report."""
    text, leaf = ctx.value("PV2-12")
    text = text.strip()
    if not text:
        return None
    escaped = html.escape(text, quote=False)
    if escaped == text:
        ctx.consume(leaf)
    return {"status": "additional", "div": f'<div xmlns="{XHTML}">{escaped}</div>'}


def mode_of_arrival(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current CWE (PV2-38) → the encounter-modeOfArrival extension (a Coding)."""
    concept = cwe_concept(ctx, None)
    codings = (concept or {}).get("coding") or []
    if not codings:
        return None
    return {"url": MODE_OF_ARRIVAL, "valueCoding": codings[0]}


CLINICAL_FUNCTIONS: dict[str, Function] = {
    "patient_scoped_identifier": patient_scoped_identifier,
    "relative_identifier": relative_identifier,
    "visit_scoped_identifier": visit_scoped_identifier,
    "allergy_identifier": allergy_identifier,
    "care_team_identifier": care_team_identifier,
    "message_observation_identifier": message_observation_identifier,
    "insurer_scoped_identifier": insurer_scoped_identifier,
    "optional_cx_identifier": optional_cx_identifier,
    "optional_ei_identifier": optional_ei_identifier,
    "location_identifier": location_identifier,
    "unit_identifier": unit_identifier,
    "place_details": place_details,
    "location_assigned": location_assigned,
    "location_prior": location_prior,
    "location_temporary": location_temporary,
    "location_pending": location_pending,
    "location_prior_temporary": location_prior_temporary,
    "location_prior_pending": location_prior_pending,
    "pam_fr_trigger_check": pam_fr_trigger_check,
    "prior_visit_identifier": prior_visit_identifier,
    "allergy_statuses": allergy_statuses,
    "cwe_codings": cwe_codings,
    "allergy_recorder": allergy_recorder,
    "location_medical_unit": location_medical_unit,
    "location_care_unit": location_care_unit,
    "xpn_name": xpn_name,
    "contact_point": contact_point,
    "birth_date": birth_date,
    "relationship_concept": relationship_concept,
    "contact_role": contact_role,
    "allergy_category_original": allergy_category_original,
    "allergy_severity_original": allergy_severity_original,
    "planned_start": planned_start,
    "planned_end": planned_end,
    "visit_description": visit_description,
    "mode_of_arrival": mode_of_arrival,
}
