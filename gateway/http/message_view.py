"""A stored message as the console shows it: segments and fields, and the FHIR it produced.

Masking is leaf by leaf and only where a value identifies someone (a patient's names, identifiers,
birth date, address, phone; next of kin, guarantor, insured person; free text that may name them).
Codes (LOINC, units, statuses), segment names and the header stay readable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from gateway.core.errors import MessageError
from gateway.hl7.er7 import Message
from gateway.http.masking import MASK

_ALL = frozenset(range(1, 1000))
# Components kept readable, by data type: for an identifier (CX) only its number identifies; the
# name type, address country and type, phone use and equipment are codes.
_CX = frozenset(range(2, 20))
_XPN = frozenset({7, 8, 9, 10})
_XAD = frozenset({6, 7})
_XTN = frozenset({2, 3})
_NONE: frozenset[int] = frozenset()
# Fields that identify a person, per segment, with the components of each that stay readable.
_IDENTIFYING: Mapping[str, Mapping[int, frozenset[int]]] = {
    "PID": {
        **dict.fromkeys((2, 3, 4, 18, 21), _CX),
        **dict.fromkeys((5, 6, 9), _XPN),
        **dict.fromkeys((11, 12), _XAD),
        **dict.fromkeys((13, 14), _XTN),
        **dict.fromkeys((7, 19, 20, 23, 29), _NONE),
    },
    "PD1": {12: _NONE},
    "MRG": {**dict.fromkeys((1, 2, 3, 4, 5, 6), _CX), 7: _XPN},
    "NK1": dict.fromkeys(_ALL - {1, 3, 7}, _NONE),
    "GT1": dict.fromkeys(_ALL - {1, 10}, _NONE),
    "IN1": {16: _XPN, 18: _NONE, 19: _XAD, 36: _NONE, 43: _NONE, 44: _XAD, 49: _CX},
    "IN2": dict.fromkeys(_ALL - {1}, _NONE),
    "IN3": {2: _NONE},
    "PV1": {19: _CX, 50: _CX},
    "ZFD": dict.fromkeys(_ALL, _NONE),
    "NTE": {3: _NONE},
    "ACC": {3: _NONE},
}
# OBX-5 is free text for these value types: it may name the patient.
_TEXT_TYPES = frozenset({"ST", "TX", "FT", "ED", "RP"})


def _mask_leaves(value: str, component: str, repetition: str, subcomponent: str, keep: frozenset[int]) -> str:
    """Each non-empty leaf becomes MASK, but for the components in ``keep``; the separators stay,
    so the structure shows."""
    out = []
    for rep in value.split(repetition):
        comps = []
        for i, comp in enumerate(rep.split(component), 1):
            if i in keep:
                comps.append(comp)
            else:
                comps.append(subcomponent.join(MASK if s else "" for s in comp.split(subcomponent)))
        out.append(component.join(comps))
    return repetition.join(out)


def hl7_fields(raw: bytes, default_charset: str, *, reveal: bool) -> list[dict[str, Any]] | None:
    """Segments as [{name, fields: [{n, value, masked}]}], or None when the bytes are not HL7v2."""
    try:
        msg = Message.decode(raw, default_charset=default_charset)
    except MessageError:
        return None
    seps = msg.separators
    out: list[dict[str, Any]] = []
    for seg in msg.segments:
        identifying = dict(_IDENTIFYING.get(seg.name, {}))
        if seg.name == "OBX" and seg.field(2) in _TEXT_TYPES:
            identifying[5] = _NONE
        fields = []
        for n in range(1, len(seg) + 1):
            value = seg.field(n)
            if not value:
                continue
            masked = not reveal and n in identifying and seg.name != "MSH"
            if masked:
                value = _mask_leaves(
                    value, seps.component, seps.repetition, seps.subcomponent, identifying[n]
                )
            fields.append({"n": n, "value": value, "masked": masked and MASK in value})
        out.append({"name": seg.name, "fields": fields})
    return out


# FHIR elements that identify a person, by resource type ("*": any type).
_PERSON = frozenset({"name", "telecom", "address", "birthDate", "photo", "contact", "deceasedDateTime"})
_FHIR_IDENTIFYING: Mapping[str, frozenset[str]] = {
    "Patient": _PERSON,
    "RelatedPerson": _PERSON,
    "Person": _PERSON,
    "Coverage": frozenset({"subscriberId"}),
}
_IDENTIFIER_VALUES = frozenset({"Patient", "RelatedPerson", "Person", "Coverage", "Account", "Encounter"})
_ANYWHERE = frozenset({"div", "valueString", "data"})  # narrative, free text, documents
_EXTENSIONS = ("birthPlace", "birth-list-given-name", "hl7v2-segment:ZFD")


# Inside a masked element, these stay: they are codes (a name's use, an address's country...).
_CODES = frozenset({"use", "type", "system", "country", "rank", "period", "relationship"})


def _masked(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: (v if k in _CODES else _masked(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return MASK if value not in (None, "") else value


def _mask_query(url: str) -> str:
    """A conditional request's URL names the resource by its identifiers: their values go."""
    path, sep, query = url.partition("?")
    if not sep:
        if "=" not in url:
            return url
        path, query = "", url  # ifNoneExist: the query alone
    parts = []
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        system, bar, _ = value.rpartition("|")
        parts.append(name + eq + ((system + bar + MASK) if bar else (MASK if value else "")))
    return path + sep + "&".join(parts)


def _mask_fhir(node: Any, resource_type: str, key: str = "") -> Any:
    if isinstance(node, list):
        return [_mask_fhir(v, resource_type, key) for v in node]
    if not isinstance(node, Mapping):
        if key in _ANYWHERE and isinstance(node, str):
            return MASK
        return node
    kind = str(node.get("resourceType") or resource_type)
    if isinstance(node.get("url"), str) and any(e in node["url"] for e in _EXTENSIONS):
        return {k: (v if k == "url" else _masked(v)) for k, v in node.items()}
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k in _FHIR_IDENTIFYING.get(kind, ()):
            out[k] = _masked(v)
        elif k == "identifier" and kind in _IDENTIFIER_VALUES:
            out[k] = [_mask_identifier(i) for i in v] if isinstance(v, list) else _mask_identifier(v)
        elif k in ("url", "ifNoneExist") and key == "request" and isinstance(v, str):
            out[k] = _mask_query(v)
        elif k == "note" and isinstance(v, list):
            out[k] = [{**n, "text": _masked(n.get("text"))} if isinstance(n, Mapping) else n for n in v]
        else:
            out[k] = _mask_fhir(v, kind, k)
    return out


def _mask_identifier(identifier: Any) -> Any:
    if not isinstance(identifier, Mapping):
        return identifier
    return {k: (_masked(v) if k == "value" else v) for k, v in identifier.items()}


def fhir_tree(payload: bytes | None, *, reveal: bool) -> Any:
    """The JSON of a FHIR payload, masked element by element unless revealed (None if not JSON)."""
    if payload is None:
        return None
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return data if reveal else _mask_fhir(data, "")


def stored_links(bundle: Any, responses: list[Any]) -> list[str | None]:
    """For each entry of a transaction Bundle, the /fhir path of the resource it stored, read from
    the transaction-response (entry i answers entry i)."""
    entries = bundle.get("entry", []) if isinstance(bundle, Mapping) else []
    links: list[str | None] = [None] * len(entries)
    for response in responses:
        answered = response.get("entry", []) if isinstance(response, Mapping) else []
        for i, entry in enumerate(answered[: len(entries)]):
            location = (entry.get("response") or {}).get("location") if isinstance(entry, Mapping) else None
            if isinstance(location, str) and links[i] is None:
                parts = location.split("/")
                if len(parts) >= 2 and parts[0].isalpha():
                    links[i] = f"/fhir/{parts[0]}/{parts[1]}"
    return links
