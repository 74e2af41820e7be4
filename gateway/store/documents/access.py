"""Who may see what, and who may change what of a published document: the DMP's visibility and
authorship rules, over the document tables (``DocOps``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.core.errors import Forbidden
from gateway.store.documents.model import VISIBILITY, Actor, split_identifier
from gateway.store.documents.ops import DocOps, identifier_patients, is_archived
from gateway.store.documents.valuesets import codings

# -- who may see what --------------------------------------------------------------------------


async def allowed_patients(ops: DocOps, actor: Actor) -> set[str] | None:
    """The "Patient/id" records this actor may see; None when it is not limited to some."""
    if actor.patients is None:
        return None
    return await identifier_patients(ops, [split_identifier(p) for p in actor.patients])


def authored_sql(actor: Actor) -> tuple[str, list[Any]] | None:
    """SQL selecting the ids of the documents this actor's practitioner authored, or None."""
    if not actor.practitioner:
        return None
    system, value = split_identifier(actor.practitioner)
    # A practitioner id may come as "8|<RPPS>": the IDNPS value is then "8<RPPS>".
    values = sorted({value} | ({system + value} if system and ":" not in system else set()))
    marks = ",".join("?" * len(values))
    sql = f"SELECT id FROM doc_tokens WHERE param='author.identifier' AND value IN ({marks})"  # noqa: S608
    args: list[Any] = list(values)
    if system and ":" in system:
        sql += " AND system=?"
        args.append(system)
    return sql, args


async def is_author(ops: DocOps, actor: Actor, doc_id: str) -> bool:
    authored = authored_sql(actor)
    if authored is None:
        return False
    sql, args = authored
    return bool(await ops.rows(f"{sql} AND id=?", [*args, doc_id]))


async def visible(ops: DocOps, actor: Actor, patient: str, mask: int, doc_id: str) -> bool:
    """Whether this actor may see a document of ``patient`` carrying the visibility bits ``mask``."""
    # A document masked from professionals stays visible to its author, who may unmask it.
    if mask & actor.hidden and not await is_author(ops, actor, doc_id):
        return False
    allowed = await allowed_patients(ops, actor)
    return allowed is None or patient in allowed


def is_unrestricted(actor: Actor) -> bool:
    """An actor no visibility rule limits (operators, administrators, the feed)."""
    return actor.patients is None and not actor.hidden


# "DocumentReference/id" at the end of a reference (relative, absolute, or versioned).
_DOCUMENT_REFERENCE = re.compile(r"(?:^|/)DocumentReference/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]*)?$")


def _listed_document(entry: Any) -> str | None:
    item = entry.get("item") if isinstance(entry, dict) else None
    ref = item.get("reference") if isinstance(item, dict) else None
    match = _DOCUMENT_REFERENCE.search(ref) if isinstance(ref, str) else None
    return match[1] if match else None


async def _visible_documents(ops: DocOps, actor: Actor, ids: set[str]) -> set[str]:
    """Which of these DocumentReference ids the actor may see; an id that names no live document
    counts as seen (there is nothing to hide about it)."""
    if is_unrestricted(actor) or not ids:
        return set(ids)
    marks = ",".join("?" * len(ids))
    rows = await ops.rows(
        "SELECT r.id, d.patient, d.mask FROM resources r LEFT JOIN doc_index d ON d.id=r.id"  # noqa: S608
        f" WHERE r.type='DocumentReference' AND r.deleted=0 AND r.id IN ({marks})",
        sorted(ids),
    )
    seen = set(ids) - {str(row[0]) for row in rows}
    authored: set[str] = set()
    if (mine := authored_sql(actor)) is not None:
        sql, args = mine
        authored = {str(r[0]) for r in await ops.rows(f"{sql} AND id IN ({marks})", [*args, *sorted(ids)])}
    allowed = await allowed_patients(ops, actor)
    for id_, patient, mask in rows:
        if patient is None:
            continue  # not published through the store: shown to unrestricted callers only
        if int(mask or 0) & actor.hidden and str(id_) not in authored:
            continue
        if allowed is None or patient in allowed:
            seen.add(str(id_))
    return seen


async def visible_list(ops: DocOps, actor: Actor, item: dict[str, Any]) -> dict[str, Any] | None:
    """A List as this actor may see it: without the entries of documents hidden from it, and
    None when every document it names is hidden (the List would reveal them only)."""
    entries = item.get("entry")
    if is_unrestricted(actor) or not isinstance(entries, list):
        return item
    listed = {i: doc for i, e in enumerate(entries) if (doc := _listed_document(e)) is not None}
    if not listed:
        return item
    seen = await _visible_documents(ops, actor, set(listed.values()))
    hidden = {i for i, doc in listed.items() if doc not in seen}
    if not hidden:
        return item
    if len(hidden) == len(listed):
        return None
    return {**item, "entry": [e for i, e in enumerate(entries) if i not in hidden]}


async def check_author(ops: DocOps, actor: Actor, doc_id: str) -> None:
    """Only the document's author may delete it (DMP rule); 403 for anyone else."""
    if actor.may_delete_any or await is_author(ops, actor, doc_id):
        return
    raise Forbidden("only the document's author may delete it", location="DocumentReference.author")


# -- who may change what of a published document -------------------------------------------------
#
# A published document's status, visibility (every securityLabel: the TRE_A07 codes and the
# confidentiality) and archive flag are its author's (DMP: the author deletes, replaces, makes a
# document visible to the patient after the announcement consultation...). Administrators and the
# gateway's own feed (``may_delete_any``) may change them too. The patient may mask a document
# of their own record from an audience of professionals, and unmask it: the codes below, and
# nothing else. Anyone else changes none of them (403).

PATIENT_LABELS = frozenset({"MASQUE_PS", "MASQUE_PSOCIAL", "MASQUE_PT"})


def _label_set(doc: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    out: set[tuple[str, str, str]] = set()
    for label in doc.get("securityLabel") or ():
        found = codings(label)
        if not found:
            out.add(("", "", orjson.dumps(label).decode()))  # not a coded label: compared whole
        for coding in found:
            out.add(
                (str(coding.get("system", "")), str(coding.get("code", "")), str(coding.get("display", "")))
            )
    return out


def metadata_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[list[str], set[str]]:
    """(the elements a metadata update changes: status, isArchived; the securityLabel codes it adds
    or removes, as "system|code")."""
    changed = [name for name in ("status",) if before.get(name) != after.get(name)]
    if is_archived(before) != is_archived(after):
        changed.append("isArchived")
    labels = {f"{system}|{code}" for system, code, _ in _label_set(before) ^ _label_set(after)}
    return changed, labels


async def check_metadata_rights(
    ops: DocOps, actor: Actor, doc_id: str, before: Mapping[str, Any], after: Mapping[str, Any]
) -> None:
    """403 unless this actor may make this change to this (visible) document: see above."""
    changed, labels = metadata_changes(before, after)
    if (not changed and not labels) or actor.may_delete_any:
        return
    if actor.patients is not None:  # the patient, on their own record (visibility checked before)
        patient_may = {f"{VISIBILITY}|{code}" for code in PATIENT_LABELS}
        if changed or not labels <= patient_may:
            raise Forbidden(
                "a patient may only mask or unmask a document from professionals"
                f" ({', '.join(sorted(PATIENT_LABELS))}); its author changes the rest",
                location=f"DocumentReference.{changed[0] if changed else 'securityLabel'}",
            )
        return
    if await is_author(ops, actor, doc_id):
        return
    if "status" in changed:
        what, where = "status", "status"
    elif labels:
        what, where = "visibility (securityLabel)", "securityLabel"
    else:
        what, where = "archive flag", "extension"
    raise Forbidden(
        f"only the document's author may change its {what}", location=f"DocumentReference.{where}"
    )
