"""Mapping functions for the orders, pharmacy, problem, referral, laboratory and document feeds
(mappings/pharmacy.yaml, oul.yaml, ppr.yaml, ref.yaml, mdm_notifications.yaml).

**Pharmacy order groups** (RDE_O11/O25, RDS_O13: ORC, [RXO [NTE] {RXR} {RXC}], RXE [NTE] {TQ1}
{RXR} {RXC}, [RXD [NTE] {RXR} {RXC}]…). An RXR or RXC belongs to the RXO, RXE or RXD it follows
(its *block*): the order's route comes from its RXE's RXR, a dispense's from its RXD's. The block
ends at the next segment that opens another part of the group (``_BLOCK_ENDS``).

**Which order a dispense or a result belongs to** is its group's number, in that number's
namespace (never a bare value): the pharmacy's (filler) number ORC-3, else its prescription number
(RXE-15, else RXD-7), else the placer's ORC-2; a result without any order is named by its specimen.
"""

from __future__ import annotations

import re
from typing import Any, Final

from gateway.mapping.documents import _ei_identifier
from gateway.mapping.engine import Context, search_token
from gateway.mapping.functions import (
    _IDNPS_ADELI,
    _IDNPS_RPPS,
    _NATIONAL_PREFIX,
    IDNPS_OID,
    RPPS_SYSTEM,
    _assigner,
    _fr_type,
    _namespaced,
    annotation,
    coding_system,
    concept_at,
    decimal,
    hl7_datetime,
    observation_identifier,
    order_number,
    result_set_id,
)
from gateway.mapping.namespaces import Authority

# A quantity's units: the field that holds them for each field holding a number (HL7 v2.5+).
UNITS: Final = {
    "RXO-2": "RXO-4",  # requested give amount (min, max) ^ requested give units
    "RXO-3": "RXO-4",
    "RXO-11": "RXO-12",  # requested dispense amount ^ units
    "RXE-3": "RXE-5",  # give amount (min, max) ^ give units
    "RXE-4": "RXE-5",
    "RXE-10": "RXE-11",  # dispense amount ^ units
    "RXD-4": "RXD-5",  # actual dispense amount ^ units
}
# Where the give code and dosage form of each pharmacy segment are (v2.5+).
_GIVE: Final = {"RXE": (2, 6), "RXO": (1, 5), "RXD": (2, 6)}
# Segments that end the RXR/RXC block of the RXO, RXE or RXD before them.
_BLOCK_ENDS: Final = frozenset({"ORC", "RXO", "RXE", "RXD", "RXG", "RXA", "OBX", "FT1", "BLG", "CTI", "PID"})
DATA_ABSENT_REASON: Final = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
_UNSIGNED_INT_MAX: Final = 2**31 - 1
_WHOLE: Final = re.compile(r"\d+")


# -- pharmacy: identity ----------------------------------------------------------------------------


def _first(ctx: Context, seg: str) -> int | None:
    mine = ctx.members(seg)
    return mine[0] if mine else None


def prescription_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The pharmacy's prescription number of the order group (RXE-15, else its first RXD-7) →
    an identifier in the sender's ``prescription`` namespace (an ST names no authority)."""
    rxe, rxd = _first(ctx, "RXE"), _first(ctx, "RXD")
    for path in ([f"RXE[{rxe}]-15"] if rxe else []) + ([f"RXD[{rxd}]-7"] if rxd else []):
        value = ctx.read(path)
        if not value:
            continue
        system = ctx.system("prescription", Authority(), path)
        ctx.take(path)
        # the dispense names the same prescription again: that number reaches the output too
        if rxd is not None and path.startswith("RXE") and ctx.read(f"RXD[{rxd}]-7") == value:
            ctx.take(f"RXD[{rxd}]-7")
        return {"system": system, "value": value}
    return None


def _group_number(ctx: Context) -> tuple[str, str, str] | None:
    """(system, value, path) of the number that names the current order group: ORC-3, else the
    prescription number (RXE-15, RXD-7), else ORC-2; None when the group has none."""
    if ctx.read("ORC-3.1"):
        system, _ = _namespaced(
            ctx, "filler-order", ("ORC-3.2", "ORC-3.3", "ORC-3.4"), ctx.field_here("ORC", 3)
        )
        return system, ctx.read("ORC-3.1"), "ORC-3.1"
    rxe = _first(ctx, "RXE")
    candidates = ([f"RXE[{rxe}]-15"] if rxe else []) + (
        [f"RXD[{ctx.segment[1]}]-7"] if ctx.segment and ctx.segment[0] == "RXD" else []
    )
    for path in candidates:
        if ctx.read(path):
            return ctx.system("prescription", Authority(), path), ctx.read(path), path
    if ctx.read("ORC-2.1"):
        system, _ = _namespaced(
            ctx, "placer-order", ("ORC-2.2", "ORC-2.3", "ORC-2.4"), ctx.field_here("ORC", 2)
        )
        return system, ctx.read("ORC-2.1"), "ORC-2.1"
    return None


def dispense_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current RXD → the dispense's identifier: its order group's number (``_group_number``)
    and its dispense sub-id counter (RXD-1: 1 for the first dispense of the order, then 2…), else
    its place among the group's RXD; without any number, the message's control id and the RXD (a
    replay updates it, another message never does)."""
    occ = ctx.segment[1] if ctx.segment else 1
    counter = ctx.read(f"RXD[{occ}]-1")
    siblings = ctx.members("RXD")
    place = siblings.index(occ) + 1 if occ in siblings else occ
    suffix = counter if counter and _WHOLE.fullmatch(counter) else f"p{place}"
    number = _group_number(ctx)
    if number is None:
        system = ctx.system("dispense", Authority(), ctx.field_here("RXD", 1))
        return {"system": system, "value": f"{ctx.message.control_id}-{occ}"}
    system, value, path = number
    ctx.take(path)
    if suffix == counter:
        ctx.take(f"RXD[{occ}]-1")
    return {"system": system, "value": f"{value}-{suffix}"}


def dispense_prescription(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current RXD's prescription number (RXD-7), when it is not the one its order is known by
    (RXE-15): a logical reference to that prescription, in the ``prescription`` namespace."""
    occ = ctx.segment[1] if ctx.segment else 1
    path = f"RXD[{occ}]-7"
    value = ctx.read(path)
    if not value:
        return None
    rxe = _first(ctx, "RXE")
    known = ctx.read(f"RXE[{rxe}]-15") if rxe else ""
    if not known or known == value:
        return None  # the order is named by this number already (prescription_identifier)
    system = ctx.system("prescription", Authority(), path)
    ctx.take(path)
    return {"identifier": {"system": system, "value": value}, "type": "MedicationRequest"}


# -- pharmacy: content -----------------------------------------------------------------------------


def quantity(ctx: Context, value: Any) -> dict[str, Any] | None:
    """A number (the rule's ``from``) with its units (the CWE field ``UNITS`` names for it: code ^
    text ^ coding system) → Quantity; the code and system only when the system is known (UCUM…)."""
    number = decimal(ctx, value)
    if number is None:
        return None
    out: dict[str, Any] = {"value": number}
    source = ctx.source or ""
    seg, _, fld = source.partition("-")
    units = UNITS.get(f"{seg.split('[')[0]}-{fld}")
    if units is None:
        return out
    occ = ctx.occurrence(seg) or 1
    base = f"{units.split('-')[0]}[{occ}]-{units.split('-')[1]}"
    code, text, name = (ctx.read(f"{base}.{c}") for c in (1, 2, 3))
    if text:
        out["unit"] = ctx.take(f"{base}.2")
    elif code:
        out["unit"] = ctx.take(f"{base}.1")
    uri = coding_system(ctx, name) if name else None
    if code and uri is not None:
        out["system"], out["code"] = uri, ctx.take(f"{base}.1")
        ctx.take(f"{base}.3")
    return out


def unsigned_int(ctx: Context, value: Any) -> int | None:
    """An NM that FHIR keeps as unsignedInt (0 … 2^31-1, no fraction); anything else is reported."""
    text = str(value or "").strip()
    if _WHOLE.fullmatch(text) and int(text) <= _UNSIGNED_INT_MAX:
        return int(text)
    if text:
        ctx.degrade(f"{ctx.place()}: not a whole number from 0 to {_UNSIGNED_INT_MAX}; left out")
    return None


def _anchor(ctx: Context) -> tuple[str, int] | None:
    """The pharmacy segment whose block the current rule reads: the RXD being mapped, else the order
    group's RXE, else its RXO."""
    if ctx.segment is not None and ctx.segment[0] in _GIVE:
        return ctx.segment
    for seg in ("RXE", "RXO"):
        occ = _first(ctx, seg)
        if occ is not None:
            return seg, occ
    return None


def _block(ctx: Context, anchor: tuple[str, int], name: str) -> list[int]:
    """The occurrences of ``name`` in the anchor's block: after it, before the block ends."""
    counts: dict[str, int] = {}
    inside, out = False, []
    for segment in ctx.message.segments:
        counts[segment.name] = occ = counts.get(segment.name, 0) + 1
        if (segment.name, occ) == anchor:
            inside = True
            continue
        if not inside:
            continue
        if segment.name in _BLOCK_ENDS:
            break
        if segment.name == name:
            out.append(occ)
    return out


def _rxr(ctx: Context, fld: int) -> dict[str, Any] | None:
    anchor = _anchor(ctx)
    if anchor is None:
        return None
    routes = _block(ctx, anchor, "RXR")
    if not routes:
        return None
    if len(routes) > 1 and fld == 1:
        ctx.warnings.append(
            f"RXR[{routes[1]}]: only the first RXR of {anchor[0]}[{anchor[1]}] makes the dosage's route; "
            f"{len(routes) - 1} more in the unmapped report"
        )
    return concept_at(ctx, "RXR", routes[0], fld)


def rxr_route(ctx: Context, _: Any) -> dict[str, Any] | None:
    """RXR-1 of the block's first RXR → Dosage.route (HL7 V2-to-FHIR, Segment RXR to MedicationRequest)."""
    return _rxr(ctx, 1)


def rxr_site(ctx: Context, _: Any) -> dict[str, Any] | None:
    """RXR-2 (administration site) → Dosage.site."""
    return _rxr(ctx, 2)


def rxr_method(ctx: Context, _: Any) -> dict[str, Any] | None:
    """RXR-4 (administration method) → Dosage.method."""
    return _rxr(ctx, 4)


def _medication(ctx: Context, anchor: tuple[str, int]) -> dict[str, Any] | None:
    seg, occ = anchor
    code_field, form_field = _GIVE[seg]
    concept = concept_at(ctx, seg, occ, code_field)
    components = _block(ctx, anchor, "RXC")
    if not components:
        return {"medicationCodeableConcept": concept} if concept else None
    # A compound (RXC: its base and additives): the medication is a contained Medication whose
    # ingredients are the components; R4 has no other place for them.
    medication: dict[str, Any] = {"resourceType": "Medication", "id": "compound"}
    if concept:
        medication["code"] = concept
    form = concept_at(ctx, seg, occ, form_field)
    if form:
        medication["form"] = form
    ingredients = []
    for n in components:
        item = concept_at(ctx, "RXC", n, 2)
        if item:
            ingredients.append({"itemCodeableConcept": item})
    if ingredients:
        medication["ingredient"] = ingredients
    if len(medication) == 2:
        return None
    return {"contained": [medication], "medicationReference": {"reference": "#compound"}}


def _timing_segment(ctx: Context) -> int | None:
    """The TQ1 that times the order: the first of its RXE's (else RXO's) block, else the group's."""
    anchor = _anchor(ctx)
    if anchor is not None:
        mine = _block(ctx, anchor, "TQ1")
        if mine:
            return mine[0]
    return _first(ctx, "TQ1")


def dosage_timing(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The order's TQ1 → Dosage (HL7 V2-to-FHIR, TQ1[MedicationRequest]): TQ1-7/-8 the timing's
    boundsPeriod, TQ1-14 its countMax, TQ1-10 (condition text) an additional instruction, TQ1-11
    (text instruction) the dosage's text. The other TQ1 fields stay reported."""
    n = _timing_segment(ctx)
    if n is None:
        return None
    dosage: dict[str, Any] = {}
    period: dict[str, str] = {}
    for key, fld in (("start", 7), ("end", 8)):
        text = ctx.read(f"TQ1[{n}]-{fld}")
        moment = hl7_datetime(ctx, text) if text else None
        if moment:
            period[key] = moment
            ctx.take(f"TQ1[{n}]-{fld}")
    repeat: dict[str, Any] = {"boundsPeriod": period} if period else {}
    count = ctx.read(f"TQ1[{n}]-14")
    if count:
        if _WHOLE.fullmatch(count) and 0 < int(count) <= _UNSIGNED_INT_MAX:
            repeat["countMax"] = int(ctx.take(f"TQ1[{n}]-14"))
        else:
            ctx.degrade(f"TQ1[{n}]-14: not a whole number from 1 to {_UNSIGNED_INT_MAX}; left out")
    if repeat:
        dosage["timing"] = {"repeat": repeat}
    if ctx.read(f"TQ1[{n}]-10"):
        dosage["additionalInstruction"] = [{"text": ctx.take(f"TQ1[{n}]-10")}]
    if ctx.read(f"TQ1[{n}]-11"):
        dosage["text"] = ctx.take(f"TQ1[{n}]-11")
    return dosage or None


def order_priority(ctx: Context, _: Any) -> str | None:
    """TQ1-9 (table 0485) of the order's TQ1 → MedicationRequest.priority, by the concept map."""
    n = _timing_segment(ctx)
    if n is None:
        return None
    code = ctx.read(f"TQ1[{n}]-9.1")
    table = ctx.concept_maps.get("hl7-0485-priority")
    if not code or table is None:
        return None
    if code not in table.table:
        ctx.degrade(f"TQ1[{n}]-9.1: code {code!r} not in concept map hl7-0485-priority; left out", code="103")
        return None
    ctx.take(f"TQ1[{n}]-9.1")
    return str(table.table[code])


def total_daily_dose(ctx: Context, _: Any) -> dict[str, Any] | None:
    """A total daily dose (CQ: quantity ^ units) → Dosage.maxDosePerPeriod, per one day (HL7
    V2-to-FHIR's RXO map row for RXE-19: numerator the CQ, denominator 1 d)."""
    seg, _, fld = (ctx.source or "").partition("-")
    occ = ctx.occurrence(seg) or 1
    base = f"{seg}[{occ}]-{fld.split('.')[0]}"
    number = decimal(ctx, ctx.read(f"{base}.1"))
    if number is None:
        return None
    numerator: dict[str, Any] = {"value": number}
    code, text, name = (ctx.read(f"{base}.2.{c}") for c in (1, 2, 3))
    if text:
        numerator["unit"] = ctx.take(f"{base}.2.2")
    elif code:
        numerator["unit"] = ctx.take(f"{base}.2.1")
    uri = coding_system(ctx, name) if name else None
    if code and uri is not None:
        numerator["system"], numerator["code"] = uri, ctx.take(f"{base}.2.1")
        ctx.take(f"{base}.2.3")
    ctx.take(f"{base}.1")
    day = {"value": 1, "unit": "d", "system": "http://unitsofmeasure.org", "code": "d"}
    return {"numerator": numerator, "denominator": day}


def _absent_medication(ctx: Context, where: str) -> dict[str, Any]:
    ctx.degrade(f"{where}: no medication code; set to data-absent-reason 'unknown'", code="101")
    return {
        "medicationCodeableConcept": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                    "code": "unknown",
                    "display": "Unknown",
                }
            ]
        }
    }


def ordered_medication(ctx: Context, _: Any) -> dict[str, Any]:
    """The order group's medication: the give code of its RXE (the pharmacy's encoding), else the
    requested give code of its RXO, as a CodeableConcept; a compound (RXC after it) as a contained
    Medication with the components as ingredients. Merged into the MedicationRequest."""
    anchor = _anchor(ctx)
    found = _medication(ctx, anchor) if anchor is not None else None
    return found or _absent_medication(ctx, ctx.field_here("RXE", 2))


def dispensed_medication(ctx: Context, _: Any) -> dict[str, Any]:
    """The current RXD's dispense/give code (RXD-2), as for ``ordered_medication``."""
    anchor = ctx.segment if ctx.segment and ctx.segment[0] == "RXD" else None
    found = _medication(ctx, anchor) if anchor is not None else None
    return found or _absent_medication(ctx, ctx.field_here("RXD", 2))


def block_notes(ctx: Context, _: Any) -> list[dict[str, Any]] | None:
    """The NTE of the current RXO, RXE or RXD block (right after it, or after its RXR/RXC)."""
    anchor = ctx.segment
    if anchor is None:
        return None
    notes = []
    saved = ctx.segment
    try:
        for n in _block(ctx, anchor, "NTE"):
            ctx.segment = ("NTE", n)
            note = annotation(ctx, None)
            if note:
                notes.append(note)
    finally:
        ctx.segment = saved
    return notes or None


# -- laboratory: results named by their specimen --------------------------------------------------------


def specimen_result_identifier(ctx: Context, value: Any) -> dict[str, Any] | None:
    """An OUL result's identity: as an ORU result (its order's number and OBX set id) when it sits
    in an order group; a specimen's own observation (OUL_R22: the OBX right after SPM) by the
    specimen's number (SPM-2: filler's, else placer's) and its set id, in that number's namespace."""
    if order_number(ctx) is not None:
        return observation_identifier(ctx, value)
    occ = ctx.segment[1] if ctx.segment else 1
    spm = _first(ctx, "SPM")
    if spm is not None:
        for comp in (2, 1):  # SPM-2.2 filler's number, SPM-2.1 placer's
            base = f"SPM[{spm}]-2"
            if not ctx.read(f"{base}.{comp}.1"):
                continue
            hd = (f"{base}.{comp}.2", f"{base}.{comp}.3", f"{base}.{comp}.4")
            system, assigner = _namespaced(ctx, "specimen", hd, lambda: ctx.field_here("SPM", 2))
            set_id = result_set_id(ctx, occ)
            if set_id == ctx.read("OBX-1"):
                ctx.take("OBX-1")
            ident: dict[str, Any] = {"system": system, "value": f"{ctx.take(f'{base}.{comp}.1')}-{set_id}"}
            _assigner(ident, assigner)
            return ident
    return observation_identifier(ctx, value)


# -- referrals -------------------------------------------------------------------------------------


def prd_practitioner_identifier(ctx: Context, _: Any) -> list[dict[str, Any]] | None:
    """The current PLN (PRD-7: number ^ its type ^ state ^ expiration date) → the provider's
    identifiers. A French national number (type RPPS, IDNPS or ADELI) follows the FR Core slices as
    an XCN's does (gateway.mapping.functions.practitioner_identifier); any other is namespaced by its
    type (a PLN names no assigning authority), in the sender's practitioner namespace."""
    number, kind = ctx.read(".1"), ctx.read(".2")
    if not number:
        return None
    if kind in _NATIONAL_PREFIX:
        national = _NATIONAL_PREFIX[kind] + number
        out: list[dict[str, Any]] = [
            {"type": _fr_type("IDNPS"), "system": f"urn:oid:{IDNPS_OID}", "value": national}
        ]
        if kind == "RPPS" or (kind == "IDNPS" and _IDNPS_RPPS.fullmatch(national)):
            out.insert(0, {"type": _fr_type("RPPS"), "system": RPPS_SYSTEM, "value": national[1:]})
        elif kind == "ADELI" or (kind == "IDNPS" and _IDNPS_ADELI.fullmatch(national)):
            out.append({"type": _fr_type("ADELI"), "value": national[1:]})  # FR Core gives ADELI no system
        ctx.take(".1")
        ctx.take(".2")
        return out
    resolved = ctx.resolve("practitioner", Authority(kind), lambda: ctx.here(".2"))
    if "namespace" in resolved.used:
        ctx.take(".2")
    ident: dict[str, Any] = {"system": resolved.system, "value": ctx.take(".1")}
    expires = ctx.read(".4")
    if expires:
        end = hl7_datetime(ctx, expires)
        if end:
            ident["period"] = {"end": end}
            ctx.take(".4")
    return [ident]


# -- problems --------------------------------------------------------------------------------------


PROBLEM_LIST_ITEM: Final = {
    "system": "http://terminology.hl7.org/CodeSystem/condition-category",
    "code": "problem-list-item",
    "display": "Problem List Item",
}


def problem_category(ctx: Context, _: Any) -> dict[str, Any]:
    """A PRB is a problem-list item (FHIR R4 Condition's v2 mapping: "problem" for a PRB). FHIR's
    con-3 then wants a clinicalStatus: when PRB-14 gives none FHIR knows, the message says so."""
    table = ctx.concept_maps.get("prb-14-condition-clinical")
    status = ctx.read("PRB-14.1")
    if table is None or status not in table.table:
        ctx.warnings.append(
            f"{ctx.field_here('PRB', 14)}: no FHIR clinical status for this problem-list item (Condition "
            "con-3 wants one); the Condition is written without it"
        )
    return {"coding": [dict(PROBLEM_LIST_ITEM)]}


# -- documents: notifications without content --------------------------------------------------------------


def absent_content(ctx: Context, _: Any) -> dict[str, Any]:
    """A notification (MDM^T01, T05, T09) announces a document without carrying it: the attachment
    says so with the data-absent-reason extension on its data (R4 needs a content element)."""
    return {"_data": {"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "unknown"}]}}


def mdm_related(ctx: Context, _: Any) -> dict[str, Any] | None:
    """TXA-13 (parent document) → relatesTo: an addendum (T05, T06) ``appends`` to it, a replacement
    (T09) ``replaces`` it; a conditional reference by the parent's namespaced identifier."""
    code = {"T05": "appends", "T06": "appends", "T09": "replaces"}.get(ctx.message.trigger)
    if code is None or not ctx.read("TXA-13.1"):
        return None
    # the parent's EI is read as TXA-12 is (an OID alone, or an id in its root OID or namespace)
    parent = _ei_identifier(ctx, "TXA-13")
    if parent is None:
        return None
    target = f"DocumentReference?identifier={search_token(parent['system'])}|{search_token(parent['value'])}"
    return {"code": code, "target": {"reference": target}}


FUNCTIONS: Final = {
    "prescription_identifier": prescription_identifier,
    "dispense_identifier": dispense_identifier,
    "dispense_prescription": dispense_prescription,
    "quantity": quantity,
    "unsigned_int": unsigned_int,
    "rxr_route": rxr_route,
    "rxr_site": rxr_site,
    "rxr_method": rxr_method,
    "ordered_medication": ordered_medication,
    "dosage_timing": dosage_timing,
    "order_priority": order_priority,
    "total_daily_dose": total_daily_dose,
    "dispensed_medication": dispensed_medication,
    "block_notes": block_notes,
    "specimen_result_identifier": specimen_result_identifier,
    "problem_category": problem_category,
    "prd_practitioner_identifier": prd_practitioner_identifier,
    "absent_content": absent_content,
    "mdm_related": mdm_related,
}
