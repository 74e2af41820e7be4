"""Mapping functions for the HL7v2 document feed (CI-SIS "Transmission de documents CDA en HL7v2").

MDM^T02 publishes a document (OBX-11 F), MDM^T04 deletes it (OBX-11 D), MDM^T10 replaces the
document named in TXA-13 (OBX-11 C). TXA-12 is the document's unique id: an OID alone, or an
extension with its root OID in TXA-12.3 (type ISO).

The document travels in OBX-5 (ED): it becomes ``attachment.data`` with its size and SHA-1 hash;
the document store keeps the bytes (content-addressed) and makes the Binary.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections import Counter
from typing import Any

from gateway.mapping.engine import Context, search_token
from gateway.mapping.namespaces import Authority

URI_SYSTEM = "urn:ietf:rfc:3986"
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")


def _ei_identifier(ctx: Context, path: str) -> dict[str, Any] | None:
    """An EI (TXA-12, TXA-13) → Identifier: a whole OID as a URI, else the id in its root OID
    (TXA-12.3, type ISO), else in the namespace its authority or sender resolves to."""
    value = ctx.read(f"{path}.1")
    if not value:
        return None
    if _OID.fullmatch(value):
        ctx.take(f"{path}.1")
        return {"system": URI_SYSTEM, "value": f"urn:oid:{value}"}
    authority = Authority(ctx.read(f"{path}.2"), ctx.read(f"{path}.3"), ctx.read(f"{path}.4"))
    resolved = ctx.resolve("document", authority, f"{path}.3")
    for part, comp in (("universal", ".3"), ("type", ".4")):
        if part in resolved.used:
            ctx.take(f"{path}{comp}")
    ident: dict[str, Any] = {"system": resolved.system, "value": ctx.take(f"{path}.1")}
    if authority.namespace:
        ctx.take(f"{path}.2")
        ident["assigner"] = {"display": authority.namespace}
    return ident


def mdm_document_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """TXA-12 (unique document number) → the document's identifier (also its masterIdentifier)."""
    return _ei_identifier(ctx, "TXA-12")


def mdm_replaces(ctx: Context, _: Any) -> dict[str, Any] | None:
    """TXA-13 (parent document number) → relatesTo replaces, by a conditional reference that the
    document store resolves to the published document (which becomes superseded)."""
    ident = _ei_identifier(ctx, "TXA-13")
    if ident is None:
        if ctx.message.trigger == "T10":
            ctx.warnings.append("MDM^T10 without TXA-13: nothing says which document is replaced")
        return None
    target = f"DocumentReference?identifier={search_token(ident['system'])}|{search_token(ident['value'])}"
    return {"code": "replaces", "target": {"reference": target}}


def mdm_status(ctx: Context, _: Any) -> str:
    """T04 / OBX-11 D (a deletion) → entered-in-error; T02 and T10 publish a current document."""
    result = ctx.read("OBX-11")
    if ctx.message.trigger == "T04" or result == "D":
        return "entered-in-error"
    return "current"


def decode_ed(ctx: Context) -> tuple[str, bytes] | None:
    """The current OBX-5 of type ED (source^type^subtype^encoding^data) → (content type, bytes);
    None, with a warning on the message, when there is no usable document (its parts then stay
    in the unmapped report)."""
    n = ctx.segment[1] if ctx.segment else 1
    field = f"OBX[{n}]-5"
    value_type = ctx.read(f"OBX[{n}]-2")
    if value_type != "ED":  # another type's components are not an ED's: nothing is guessed
        ctx.warnings.append(
            f"OBX[{n}]-2: value type {value_type or '(empty)'!r}, not ED: no document; "
            "its value is reported unmapped"
        )
        return None
    kind, subtype = ctx.read(f"{field}.2"), ctx.read(f"{field}.3")
    encoding, data = ctx.read(f"{field}.4"), ctx.read(f"{field}.5")
    if not data:
        ctx.warnings.append(f"{field}: ED without data; no document")
        return None
    try:
        if encoding.lower() == "base64":
            raw = base64.b64decode("".join(data.split()), validate=True)
        elif encoding.lower() == "hex":
            raw = bytes.fromhex(data)
        elif encoding in ("", "A"):  # plain text, already unescaped from ER7
            raw = data.encode("utf-8")
        else:
            ctx.warnings.append(f"{field}.4: encoding {encoding!r} unknown; no document")
            return None
    except ValueError:  # binascii.Error is a ValueError
        ctx.warnings.append(f"{field}.5: the data is not valid {encoding}; no document")
        return None
    for comp in (2, 3, 4, 5):
        ctx.take(f"{field}.{comp}")
    ctx.take(f"OBX[{n}]-2")  # the value type ED: the attachment carries it
    return _content_type(kind, subtype), raw


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


def document_key(ctx: Context) -> str:
    """A stable name for the document of the current OBX: its order's number in its namespace
    and the OBX set id; without any, the message and the OBX."""
    n = ctx.segment[1] if ctx.segment else 1
    number = order_number(ctx)
    if number is None:
        return f"{ctx.system('document', Authority(), ctx.field_here('OBX', 1))}|{ctx.message.control_id}|{n}"
    path, value, kind = number
    authority = Authority(ctx.read(f"{path}.2"), ctx.read(f"{path}.3"), ctx.read(f"{path}.4"))
    seg, _, fld = path.partition("-")
    system = ctx.system(kind, authority, lambda: ctx.field_here(seg, int(fld)))
    return f"{system}|{value}|{result_set_id(ctx, n)}"


def _content_type(kind: str, subtype: str) -> str:
    """ED type/subtype → MIME type: CDA travels as TEXT^XML (CI-SIS), PDF as application^pdf."""
    k, s = kind.lower(), subtype.lower()
    if s == "xml":
        return "application/xml" if k in ("text", "application", "") else f"{k}/xml"
    if s == "pdf":
        return "application/pdf"
    if k and s:
        return f"{k}/{s}"
    return "text/plain" if k == "text" else "application/octet-stream"


def mdm_attachment(ctx: Context, _: Any) -> dict[str, Any] | None:
    """OBX-5 → Attachment with the bytes, their size and SHA-1 hash, and the title (OBX-3.2)."""
    found = decode_ed(ctx)
    if found is None:
        return None
    content_type, raw = found
    attachment: dict[str, Any] = {
        "contentType": content_type,
        "data": base64.b64encode(raw).decode("ascii"),
        "size": len(raw),
        "hash": base64.b64encode(hashlib.sha1(raw, usedforsecurity=False).digest()).decode("ascii"),
    }
    if ctx.read("OBX-3.2"):
        attachment["title"] = ctx.take("OBX-3.2")
    return attachment


MDM_FUNCTIONS = {
    "mdm_document_identifier": mdm_document_identifier,
    "mdm_replaces": mdm_replaces,
    "mdm_status": mdm_status,
    "mdm_attachment": mdm_attachment,
}
