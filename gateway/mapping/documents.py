"""Mapping functions for the HL7v2 document feeds (CI-SIS "Transmission de documents CDA en HL7v2"
and "Transmission au LPS d'un document CDA provenant d'un courriel MSSanté").

**Actions.** MDM^T02 publishes a document (OBX-11 F), MDM^T04 deletes it (OBX-11 D), MDM^T10
replaces the document named in TXA-13 (OBX-11 C); in an ORU^R01 the action is OBX-11 of the OBX
that carries the document, with ORC-1 (NW, RO, CA) saying the same. A deletion never replaces:
TXA-13 of a T04 names the document's parent, not a document to supersede.

**Identity.** TXA-12 is the document's unique id: an OID alone, or an extension with its root OID
in TXA-12.3 (type ISO).

**Which OBX is the document.** The OBX of type ED that is neither a MetaDMPMSS flag nor the
MSSanté mail the document came with; in an MDM without one, the text lines (OBX-2 TX or FT, every
such OBX and repetition) make a text/plain document. Its OBX-3 is the document's type.

**The document.** OBX-5 (ED) becomes ``attachment.data`` (MDM) or a Binary (ORU) with its size and
SHA-1 hash; the document store keeps the bytes (content-addressed). Base64 is read leniently when
the intent is certain: the ``=`` padding is restored and whitespace dropped, with a warning. Data
that is not Base64 even then is reported (warning, its leaves in the unmapped report) and that
document alone is left out.

**MetaDMPMSS flags** (OBX-3.3 "MetaDMPMSS", OBX-5.1 Y/N, concept maps in
``mappings/conceptmaps/cisis-metadmpmss.yaml``) are facts about the document, never results:
the visibility flags valued Y become its TRE_A07 security labels (what the document store reads);
every flag, and the mail bodies (CORPSMAIL_*), is kept in the extension ``urn:passerelle:cisis:
MetaDMPMSS`` of the DocumentReference. A flag valued N, or absent, adds no label.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Any

from gateway.hl7.er7 import unescape
from gateway.mapping.engine import NULL, Context, search_token
from gateway.mapping.functions import cwe_concept, order_number, practitioner_identifier, result_set_id
from gateway.mapping.namespaces import Authority

URI_SYSTEM = "urn:ietf:rfc:3986"
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")

METADMPMSS = "MetaDMPMSS"  # OBX-3.3 of the flags (CI-SIS table « MetaDMP/MSS »)
FLAGS_MAP = "cisis-metadmpmss-flag"  # OBX-3.1 as sent → the flag's code (older names included)
LABELS_MAP = "cisis-metadmpmss-visibility"  # flag valued Y → the TRE_A07 security label
ORDER_CONTROL_MAP = "cisis-order-control-status"  # ORC-1 → the status the request gives the document
YES_NO_MAP = "hl7-0136-yes-no"
FLAGS_EXTENSION = "urn:passerelle:cisis:MetaDMPMSS"
MAIL_EXTENSION = "urn:passerelle:cisis:courriel"  # the MSSanté mail a document came from (LPS volume)
MAIL_SUBJECT = "XDM/1.0/DDM"  # how the subject of a mail carrying an IHE_XDM archive begins
TEXT_TYPES = ("TX", "FT")  # text lines that make a document in an MDM without an ED
MAIL_BODIES = frozenset({"CORPSMAIL_PS", "CORPSMAIL_PATIENT"})


# -- Base64 ------------------------------------------------------------------------------------

_B64_BODY = re.compile(r"[A-Za-z0-9+/]*")


def lenient_b64decode(text: str) -> tuple[bytes, tuple[str, ...]]:
    """Base64 text → (bytes, what had to be repaired: "whitespace", "padding").

    Repairs only what leaves no doubt: whitespace anywhere (line breaks, spaces) is dropped, and
    a missing or short ``=`` padding is completed. Anything else (another alphabet, a length no
    padding can complete, padding beyond what is needed) raises ValueError, and nothing else.
    """
    compact = "".join(text.split())
    repaired: list[str] = ["whitespace"] if compact != text else []
    body = compact.rstrip("=")
    given = len(compact) - len(body)
    if not _B64_BODY.fullmatch(body):
        raise ValueError("characters outside the Base64 alphabet")
    rest = len(body) % 4
    if rest == 1:
        raise ValueError("a length no padding completes")
    needed = (4 - rest) % 4
    if given > needed:
        raise ValueError("more padding than the data needs")
    if given < needed:
        repaired.append("padding")
    try:
        data = base64.b64decode(body + "=" * needed, validate=True)
    except binascii.Error as exc:  # not expected after the checks above; still only a ValueError
        raise ValueError(str(exc)) from None
    return data, tuple(repaired)


def _decode_data(ctx: Context, where: str, encoding: str, data: str) -> tuple[bytes, bool] | None:
    """(bytes, whether the data leaf counts as carried) of an ED's data; None, with a warning, when
    it cannot be read. Base64 repaired of its whitespace is not the text as sent: that leaf stays
    in the unmapped report (the warning says why)."""
    code = encoding.lower()
    if code == "base64":
        data = data.strip()  # spaces around the data are no repair worth a word
        try:
            raw, repaired = lenient_b64decode(data)
        except ValueError:
            ctx.warnings.append(
                f"{where}: the data is not valid Base64, even padded and without whitespace; "
                "no document (its parts are in the unmapped report)"
            )
            return None
        if "padding" in repaired:
            ctx.warnings.append(f"{where}: Base64 without its '=' padding: padded and decoded")
        if "whitespace" in repaired:
            ctx.warnings.append(
                f"{where}: Base64 with line breaks or spaces: they were dropped and the data decoded; "
                "the text as sent stays in the unmapped report"
            )
        # The output holds the data in canonical Base64: the leaf is carried when that is what came.
        sent = "".join(data.split()).rstrip("=")
        canonical = base64.b64encode(raw).decode("ascii").rstrip("=")
        if canonical != sent and "whitespace" not in repaired:
            ctx.warnings.append(
                f"{where}: Base64 whose last character holds bits no byte uses: decoded without them; "
                "the text as sent stays in the unmapped report"
            )
        return raw, canonical == data.rstrip("=")
    if code == "hex":
        try:
            return bytes.fromhex(data), True
        except ValueError:
            ctx.warnings.append(f"{where}: the data is not valid hex; no document")
            return None
    if encoding in ("", "A"):  # plain text, already unescaped from ER7
        return data.encode("utf-8"), True
    ctx.warnings.append(f"{where.rsplit('.', 1)[0]}.4: encoding {encoding!r} unknown; no document")
    return None


def _occurrence(ctx: Context, n: int | None) -> int:
    if n is not None:
        return n
    return ctx.segment[1] if ctx.segment else 1


def decode_ed(ctx: Context, n: int | None = None) -> tuple[str, bytes] | None:
    """OBX[n]-5 of type ED (source^type^subtype^encoding^data; n: the current OBX) → (content type,
    bytes); None, with a warning on the message, when there is no usable document (its parts then
    stay in the unmapped report)."""
    n = _occurrence(ctx, n)
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
    if not data.strip():
        ctx.warnings.append(f"{field}: ED without data; no document")
        return None
    decoded = _decode_data(ctx, f"{field}.5", encoding, data)
    if decoded is None:
        return None
    raw, carried = decoded
    for comp in (2, 3, 4):
        ctx.take(f"{field}.{comp}")
    if carried:
        ctx.take(f"{field}.5")
    ctx.take(f"OBX[{n}]-2")  # the value type ED: the attachment carries it
    return _content_type(kind, subtype), raw


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


def _digest(raw: bytes) -> str:
    return base64.b64encode(hashlib.sha1(raw, usedforsecurity=False).digest()).decode("ascii")


# -- which OBX is what ---------------------------------------------------------------------------


def flag_of(ctx: Context, n: int) -> str | None:
    """The MetaDMPMSS flag OBX[n] carries (its code, older names made current), or None. A flag is
    named in the MetaDMPMSS table (OBX-3.3), or by a code of that table with no table named (the
    LPS volume's first examples)."""
    code, table = ctx.read(f"OBX[{n}]-3.1"), ctx.read(f"OBX[{n}]-3.3")
    flags = ctx.concept_maps.get(FLAGS_MAP)
    known = flags.table.get(code) if flags is not None else None
    if table == METADMPMSS:
        return str(known) if known else code or None
    return str(known) if known and not table else None


def is_mail(ctx: Context, n: int) -> bool:
    """OBX[n] carries the MSSanté mail the document was taken from (subject in OBX-3.2)."""
    return ctx.read(f"OBX[{n}]-2") == "ED" and ctx.read(f"OBX[{n}]-3.2").startswith(MAIL_SUBJECT)


def is_document(ctx: Context, n: int | None = None) -> bool:
    """OBX[n] (the current one) carries a document: an ED that is no flag and no mail."""
    n = _occurrence(ctx, n)
    return ctx.read(f"OBX[{n}]-2") == "ED" and flag_of(ctx, n) is None and not is_mail(ctx, n)


def document_obx(ctx: Context) -> tuple[str, list[int]]:
    """The OBX that carry an MDM's document: ("ED", [n]) for the ED that is a document (of several,
    the first whose OBX-3 is the type TXA-2 or OBR-4 names, else the first), ("TX", [...]) for its
    text lines when it has none, ("", []) when it has neither."""
    key = ("document-obx",)
    found = ctx.memo.get(key)
    if found is None:
        mine = ctx.members("OBX")
        eds = [n for n in mine if is_document(ctx, n)]
        # Of several, the one named as the document is (TXA-2, OBR-4: its type) comes first.
        named = {ctx.read("TXA-2"), ctx.read("OBR-4.1")} - {""}
        eds.sort(key=lambda n: ctx.read(f"OBX[{n}]-3.1") not in named)
        if eds:
            found = ("ED", eds[:1])
            for n in eds[1:]:
                ctx.warnings.append(
                    f"OBX[{n}]: an MDM carries one document (CI-SIS), OBX[{eds[0]}]'s; this one "
                    "is reported unmapped"
                )
        else:
            lines = [n for n in mine if ctx.read(f"OBX[{n}]-2") in TEXT_TYPES and flag_of(ctx, n) is None]
            found = ("TX", lines) if lines else ("", [])
        ctx.memo[key] = found
    return found


# -- identifiers -----------------------------------------------------------------------------------


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
    """TXA-13 (parent document number) of a T10 → relatesTo replaces, by a conditional reference
    that the document store resolves to the published document (which becomes superseded). A
    deletion (T04) or a first transmission (T02) replaces nothing: their TXA-13 stays reported."""
    trigger = ctx.message.trigger
    if trigger != "T10":
        if ctx.read("TXA-13.1"):
            ctx.warnings.append(
                f"TXA-13: MDM^{trigger} does not replace a document (only T10 does); the parent "
                "number is reported unmapped"
            )
        return None
    ident = _ei_identifier(ctx, "TXA-13")
    if ident is None:
        ctx.warnings.append("MDM^T10 without TXA-13: nothing says which document is replaced")
        return None
    target = f"DocumentReference?identifier={search_token(ident['system'])}|{search_token(ident['value'])}"
    return {"code": "replaces", "target": {"reference": target}}


# -- status ------------------------------------------------------------------------------------------


def _order_control(ctx: Context) -> tuple[str, str | None]:
    """(ORC-1, the document status it asks for: current or entered-in-error; None when ORC-1
    says no document action)."""
    control = ctx.read("ORC-1")
    table = ctx.concept_maps.get(ORDER_CONTROL_MAP)
    wanted = table.table.get(control) if table is not None and control else None
    return control, str(wanted) if wanted else None


def _deleted(ctx: Context, result: str, *, trigger_deletes: bool = False) -> bool:
    """Whether the request deletes the document: OBX-11 D (or a T04), or ORC-1 CA. ORC-1 is taken
    when it asks for the status the document gets; when it disagrees with OBX-11 (or the event),
    a deletion wins and the message gets a warning (the CI-SIS has the PFI refuse such a message)."""
    control, by_order = _order_control(ctx)
    by_result = trigger_deletes or result == "D"
    deleted = by_result or by_order == "entered-in-error"
    status = "entered-in-error" if deleted else "current"
    if by_order is not None and (by_order == "entered-in-error") != by_result:
        ctx.warnings.append(
            f"ORC-1: order control {control!r} disagrees with the event and OBX-11 "
            f"({result or '(empty)'}); the document is {status}"
        )
    if by_order == status:
        ctx.take("ORC-1")
    return deleted


def mdm_status(ctx: Context, _: Any) -> str:
    """T04, OBX-11 D or ORC-1 CA (a deletion) → entered-in-error; T02 and T10 publish a current
    document."""
    _, obx = document_obx(ctx)
    result = ctx.read(f"OBX[{obx[0]}]-11") if obx else ""
    deleted = _deleted(ctx, result, trigger_deletes=ctx.message.trigger == "T04")
    return "entered-in-error" if deleted else "current"


def oru_document_status(ctx: Context, _: Any) -> str:
    """The current OBX's document: OBX-11 D or ORC-1 CA (a deletion) → entered-in-error; else
    current (F published, C a corrected version of the same document)."""
    n = _occurrence(ctx, None)
    return "entered-in-error" if _deleted(ctx, ctx.read(f"OBX[{n}]-11")) else "current"


def oru_report_withdrawn(ctx: Context, _: Any) -> str | None:
    """A DiagnosticReport whose documents are all deleted (OBX-11 D, or ORC-1 CA) is withdrawn:
    entered-in-error (FHIR: "withdrawn following a previous final release"); None otherwise, the
    status staying OBR-25's (table 0123)."""
    documents = [n for n in ctx.members("OBX") if is_document(ctx, n)]
    if not documents:
        return None
    _, by_order = _order_control(ctx)
    if by_order == "entered-in-error" or all(ctx.read(f"OBX[{n}]-11") == "D" for n in documents):
        return "entered-in-error"
    return None


# -- the document's content ----------------------------------------------------------------------


def mdm_attachment(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The MDM's document → Attachment with the bytes, their size and SHA-1 hash, and the title
    (OBX-3.2 of the OBX that carries it). Text lines (OBX-2 TX/FT, in order, each repetition a
    line) make a text/plain document."""
    kind, obx = document_obx(ctx)
    if kind == "ED":
        found = decode_ed(ctx, obx[0])
        if found is None:
            return None
        content_type, raw = found
    elif kind == "TX":
        lines = [_text_lines(ctx, n) for n in obx]
        raw = "\n".join(line for line in lines if line).encode("utf-8")
        if not raw:
            ctx.warnings.append(f"OBX[{obx[0]}]-5: text lines without text; no document")
            return None
        # The attachment holds the lines in Base64, not as sent: they stay in the unmapped report.
        ctx.warnings.append(
            f"{', '.join(f'OBX[{n}]-5' for n in obx)}: text lines (OBX-2 {'/'.join(TEXT_TYPES)}) make the "
            "text/plain document; the lines as sent stay in the unmapped report"
        )
        content_type = "text/plain"
    else:
        ctx.warnings.append("OBX: no OBX carries a document (ED, or TX lines); no document")
        return None
    attachment: dict[str, Any] = {
        "contentType": content_type,
        "data": base64.b64encode(raw).decode("ascii"),
        "size": len(raw),
        "hash": _digest(raw),
    }
    title = ctx.read(f"OBX[{obx[0]}]-3.2")
    if title:
        attachment["title"] = ctx.take(f"OBX[{obx[0]}]-3.2")
    return attachment


def _text_lines(ctx: Context, n: int) -> str:
    """OBX[n]-5's repetitions as lines, unescaped (HL7's null, "", is no line)."""
    segment = ctx.find("OBX", n)
    if segment is None:
        return ""
    msg = ctx.message
    seps = msg.separators
    lines = [
        unescape(r, seps, msg.codec) if seps.escape in r else r
        for r in segment.field(5).split(seps.repetition)
        if r != NULL
    ]
    return "\n".join(lines).strip("\n")


def mdm_document_type(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The document's type: OBX-3 of the OBX that carries it (LOINC or TRE_A05, JDV_J07), else
    OBR-4, else TXA-2 (a code of JDV_J07 sent alone). TXA-2 and OBR-4, when they name the same
    code, are carried by it."""
    _, obx = document_obx(ctx)
    concept: dict[str, Any] | None = None
    for path in ([f"OBX[{obx[0]}]-3"] if obx else []) + ["OBR-4"]:
        raw, leaf = ctx.locate(f"{path}[1]")
        if leaf is None or not raw.strip():
            continue
        seg, occ, fld = leaf[0], leaf[1], leaf[2]
        saved = ctx.scoped(seg, occ, fld, 1, ctx.message.repetitions(f"{seg}[{occ}]-{fld}")[0])
        try:
            concept = cwe_concept(ctx, None)
        finally:
            ctx.restore(saved)
        if concept:
            break
    if concept is None:
        if not ctx.read("TXA-2"):
            return None
        return {"coding": [{"code": ctx.take("TXA-2")}]}
    code = next((c.get("code") for c in concept.get("coding", [])), None)
    if code and ctx.read("TXA-2") == code:
        ctx.take("TXA-2")
    if code and obx and ctx.read("OBR-4.1") == code:
        # OBR-4 names the document as its OBX-3 does: what OBX-3 carried, OBR-4 says again
        for comp in (1, 2, 3):
            _, leaf = ctx.locate(f"OBX[{obx[0]}]-3.{comp}")
            if leaf in ctx.consumed and ctx.read(f"OBR-4.{comp}") == ctx.read(f"OBX[{obx[0]}]-3.{comp}"):
                ctx.take(f"OBR-4.{comp}")
    return concept


# -- MetaDMPMSS flags and the mail -----------------------------------------------------------------


def _flag_value(ctx: Context, n: int, code: str) -> bool | None:
    """OBX[n]-5.1 (HL7 table 0136) → True/False; None (with a warning) for anything else."""
    value = ctx.read(f"OBX[{n}]-5.1")
    if not value:
        return None
    table = ctx.concept_maps.get(YES_NO_MAP)
    answer = table.table.get(value) if table is not None else None
    if not isinstance(answer, bool):
        ctx.degrade(
            f"OBX[{n}]-5.1: {code} valued {value!r}, neither Y nor N (HL7 table 0136); the flag is "
            "left out and reported",
            code="103",
        )
        return None
    return answer


def _mail_body(ctx: Context, n: int) -> dict[str, Any] | None:
    """OBX[n]-5 (ED, the text of a mail) → an Attachment holding it; None, with a warning, when its
    data cannot be read (the OBX then stays in the unmapped report)."""
    if ctx.read(f"OBX[{n}]-2") != "ED":
        text = _text_lines(ctx, n)
        if not text:
            return None
        ctx.warnings.append(f"OBX[{n}]-5: the mail's text lines as sent stay in the unmapped report")
        raw = text.encode("utf-8")
        return {"contentType": "text/plain", "data": base64.b64encode(raw).decode("ascii")}
    found = decode_ed(ctx, n)
    if found is None:
        return None
    content_type, raw = found
    return {"contentType": content_type, "data": base64.b64encode(raw).decode("ascii")}


def _flag_obx(ctx: Context) -> list[tuple[int, str]]:
    return [(n, code) for n in ctx.members("OBX") if (code := flag_of(ctx, n)) is not None]


def _take_flag_code(ctx: Context, n: int) -> None:
    ctx.take(f"OBX[{n}]-3.1")
    if ctx.read(f"OBX[{n}]-3.3") == METADMPMSS:
        ctx.take(f"OBX[{n}]-3.3")


def document_flags(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The MetaDMPMSS flags sent with the document (its OBX group's; an MDM's) → the extension
    ``urn:passerelle:cisis:MetaDMPMSS``: one sub-extension per flag, named by its code, valued
    true/false (Y/N), or the mail body (CORPSMAIL_*) as an attachment. Routing and delivery facts
    (DESTDMP, DESTMSSANTE*, ACK_*, CONNEXION_SECRETE, MODIF_CONF_CODE) live here; the visibility
    flags are also the document's security labels (``document_labels``)."""
    parts: list[dict[str, Any]] = []
    for n, code in _flag_obx(ctx):
        if code in MAIL_BODIES:
            body = _mail_body(ctx, n)
            if body is None:
                continue
            title = ctx.read(f"OBX[{n}]-3.2")
            if title:
                body["title"] = ctx.take(f"OBX[{n}]-3.2")
            parts.append({"url": code, "valueAttachment": body})
        else:
            value = _flag_value(ctx, n, code)
            if value is None:
                continue
            ctx.take(f"OBX[{n}]-5.1")
            ctx.take(f"OBX[{n}]-2")  # the value type: a value[x] carries it
            parts.append({"url": code, "valueBoolean": value})
        _take_flag_code(ctx, n)
    return {"url": FLAGS_EXTENSION, "extension": parts} if parts else None


def document_labels(ctx: Context, _: Any) -> list[dict[str, Any]] | None:
    """The visibility flags valued Y → the document's TRE_A07 security labels (concept map
    cisis-metadmpmss-visibility: MASQUE_PS, INVISIBLE_PATIENT, INVISIBLE_REP_LEGAUX →
    INVISIBLE_REPRESENTANTS_LEGAUX, CONNEXION_SECRETE → INVISIBLE_REPRESENTANTS_LEGAUX). A flag
    valued N, or absent, adds nothing."""
    table = ctx.concept_maps.get(LABELS_MAP)
    if table is None:
        return None
    labels: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for n, code in _flag_obx(ctx):
        target = table.table.get(code)
        if not isinstance(target, dict) or ctx.read(f"OBX[{n}]-5.1") != "Y":
            continue
        key = (str(target.get("system")), str(target.get("code")))
        if key not in seen:
            seen.add(key)
            labels.append({"coding": [dict(target)]})
    return labels or None


def document_mail(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The MSSanté mail the document was taken from (LPS volume: OBX-3.1 its Message-ID, OBX-3.2
    its subject, OBX-5 its content) → the extension ``urn:passerelle:cisis:courriel``."""
    for n in ctx.members("OBX"):
        if not is_mail(ctx, n) or flag_of(ctx, n) is not None:
            continue
        parts: list[dict[str, Any]] = []
        body = _mail_body(ctx, n)
        if body is not None:
            parts.append({"url": "content", "valueAttachment": body})
        if parts:
            if ctx.read(f"OBX[{n}]-3.1"):
                parts.insert(0, {"url": "message-id", "valueString": ctx.take(f"OBX[{n}]-3.1")})
            parts.insert(0, {"url": "subject", "valueString": ctx.take(f"OBX[{n}]-3.2")})
            return {"url": MAIL_EXTENSION, "extension": parts}
    return None


FR_CS_0203 = "https://hl7.fr/ig/fhir/core/CodeSystem/fr-core-cs-v2-0203"
FINESS_SYSTEM = "https://finess.esante.gouv.fr"
IDNPS_OID = "1.2.250.1.71.4.2.1"
IDNST_OID = "1.2.250.1.71.4.2.2"
_IDNPS_OF_RPPS = re.compile(r"8\d{11}")  # national id of an RPPS number: 8 + its 11 digits


def prt_practitioner_identifier(ctx: Context, value: Any) -> list[dict[str, Any]] | None:
    """The current XCN of a PRT (PRT-5) → the FR Core Practitioner identifiers, as for any XCN
    (gateway.mapping.functions.practitioner_identifier), except a number typed RPPS (XCN-13) that
    is the national id of an RPPS number (8 + 11 digits, as the CI-SIS examples send it): it is
    that IDNPS alone (no RPPS derived: the same person sent as IDNPS elsewhere is found by it),
    and the type RPPS stays reported."""
    number = ctx.read(".1")
    if ctx.read(".13") != "RPPS" or not _IDNPS_OF_RPPS.fullmatch(number):
        return practitioner_identifier(ctx, value)
    ctx.warnings.append(
        f"{ctx.here('.1')}: typed RPPS but holds 12 digits, 8 + an RPPS number: kept as that national id "
        "(IDNPS), the key the same person has when sent as IDNPS; the type is reported"
    )
    ctx.take(".1")
    idnps: dict[str, Any] = {
        "type": {"coding": [{"system": FR_CS_0203, "code": "IDNPS"}]},
        "system": f"urn:oid:{IDNPS_OID}",
        "value": number,
    }
    if ctx.read(".9.2") == IDNPS_OID and ctx.read(".9.3") in ("ISO", ""):
        assigner = ctx.take(".9.1")
        ctx.take(".9.2")
        ctx.take(".9.3")
        if assigner:
            idnps["assigner"] = {"display": assigner}
    return [idnps]


def xon_organization_identifier(ctx: Context, _: Any) -> list[dict[str, Any]] | None:
    """The current XON (PRT-8 of the "SB" PRT: XON-10 the number, XON-7 its type FINEG/FINEJ,
    XON-6 its authority) → FR Core Organization identifiers: a 9-character FINESS in the
    ``finess`` slice; a national structure id (authority 1.2.250.1.71.4.2.2, "1" + FINESS) in the
    ``idNatSt`` slice with the FINESS it holds. Anything else is reported, with a warning."""
    number, kind = ctx.read(".10").strip(), ctx.read(".7")
    if not number or kind not in ("FINEG", "FINEJ"):
        return None
    finess: dict[str, Any] = {
        "use": "official",
        "type": {"coding": [{"system": FR_CS_0203, "code": kind}]},
        "system": FINESS_SYSTEM,
    }
    if ctx.read(".6.2") == IDNST_OID and len(number) == 10 and number.startswith("1"):
        idnst: dict[str, Any] = {
            "type": {"coding": [{"system": FR_CS_0203, "code": "IDNST"}]},
            "system": f"urn:oid:{IDNST_OID}",
            "value": ctx.take(".10").strip(),
        }
        for comp in (".6.2", ".6.3"):
            ctx.take(comp)
        if ctx.read(".6.1"):
            idnst["assigner"] = {"display": ctx.take(".6.1")}
        ctx.take(".7")
        return [idnst, {**finess, "value": number[1:]}]
    if len(number) != 9:
        ctx.warnings.append(
            f"{ctx.here('.10')}: {kind} number {number!r} is neither a FINESS (9 characters) nor a national "
            "structure id (1 + FINESS, authority 1.2.250.1.71.4.2.2); the organization is left out"
        )
        return None
    ctx.take(".7")  # XON-6, when the national structures' authority, adds nothing to a bare FINESS
    return [{**finess, "value": ctx.take(".10").strip()}]


# -- ORU: the order group's documents ----------------------------------------------------------------


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


def _obx_document(ctx: Context) -> tuple[str, bytes, str] | None:
    """The current OBX's document: its content type, bytes and Binary id (derived from the
    document's key, so that a replay updates the same Binary and another lab's never does). A
    MetaDMPMSS mail body or an MSSanté mail is no document."""
    found = decode_ed(ctx) if is_document(ctx) else None
    if found is None:
        return None
    content_type, raw = found
    return content_type, raw, "doc-" + hashlib.sha256(document_key(ctx).encode()).hexdigest()[:40]


def document_binary(ctx: Context, _: Any) -> dict[str, Any] | None:
    """OBX ED → Binary (merged into the resource)."""
    found = _obx_document(ctx)
    if found is None:
        return None
    content_type, raw, binary_id = found
    return {"contentType": content_type, "data": base64.b64encode(raw).decode(), "id": binary_id}


def document_attachment(ctx: Context, _: Any) -> dict[str, Any] | None:
    """OBX ED → Attachment pointing at its Binary, with size and SHA-1 hash as PDSm asks."""
    found = _obx_document(ctx)
    if found is None:
        return None
    content_type, raw, binary_id = found
    attachment: dict[str, Any] = {
        "contentType": content_type,
        "size": len(raw),
        "hash": base64.b64encode(hashlib.sha1(raw, usedforsecurity=False).digest()).decode(),
        "url": f"Binary/{binary_id}",
    }
    if ctx.read("OBX-3.2"):
        attachment["title"] = ctx.take("OBX-3.2")
    return attachment


DOCUMENT_FUNCTIONS = {
    "document_binary": document_binary,
    "document_attachment": document_attachment,
    "mdm_document_identifier": mdm_document_identifier,
    "mdm_replaces": mdm_replaces,
    "mdm_status": mdm_status,
    "mdm_attachment": mdm_attachment,
    "mdm_document_type": mdm_document_type,
    "oru_document_status": oru_document_status,
    "oru_report_withdrawn": oru_report_withdrawn,
    "document_flags": document_flags,
    "document_labels": document_labels,
    "document_mail": document_mail,
    "xon_organization_identifier": xon_organization_identifier,
    "prt_practitioner_identifier": prt_practitioner_identifier,
}
