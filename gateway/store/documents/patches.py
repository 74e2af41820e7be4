"""Metadata updates of a published document: JSON Patch (RFC 6902), the FHIRPath Patch forms PDSm
uses, and the check that an update changes only status, securityLabel and the archive flag."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.core.errors import BadRequest, Conflict, MethodNotAllowed, Unprocessable
from gateway.store.documents.model import IS_ARCHIVED, STATUSES


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise BadRequest(f"JSON Pointer {path!r} must start with /", location="path")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, parts: list[str], op: str) -> tuple[Any, str]:
    node = doc
    for part in parts[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise Unprocessable(f"{op}: path does not exist", location="/" + "/".join(parts))
    if not parts:
        raise MethodNotAllowed("a patch may not replace the whole resource")
    return node, parts[-1]


def _get(doc: Any, parts: list[str]) -> Any:
    node, last = _parent(doc, parts, "read")
    if isinstance(node, dict) and last in node:
        return node[last]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        return node[int(last)]
    raise Unprocessable("path does not exist", location="/" + "/".join(parts))


def apply_json_patch(doc: dict[str, Any], operations: Any) -> dict[str, Any]:
    """RFC 6902 (add, remove, replace, move, copy, test) on a copy of ``doc``."""
    if not isinstance(operations, list):
        raise BadRequest("a JSON Patch is a list of operations")
    out: dict[str, Any] = orjson.loads(orjson.dumps(doc))
    for op in operations:
        if (
            not isinstance(op, dict)
            or not isinstance(op.get("op"), str)
            or not isinstance(op.get("path"), str)
        ):
            raise BadRequest("each JSON Patch operation needs op and path")
        kind, parts = op["op"], _pointer(op["path"])
        if kind in ("add", "replace", "test") and "value" not in op:
            raise BadRequest(f"{kind} needs a value", location=op["path"])
        if kind == "test":
            if _get(out, parts) != op["value"]:
                raise Conflict("JSON Patch test failed", location=op["path"])
            continue
        if kind in ("move", "copy"):
            source = _pointer(str(op.get("from", "")))
            value = orjson.loads(orjson.dumps(_get(out, source)))
            if kind == "move":
                _remove(out, source)
            _add(out, parts, value)
        elif kind == "add":
            _add(out, parts, op["value"])
        elif kind == "remove":
            _remove(out, parts)
        elif kind == "replace":
            _remove(out, parts)
            _add(out, parts, op["value"])
        else:
            raise BadRequest(f"unknown JSON Patch op {kind!r}", location=op["path"])
    return out


def _add(doc: Any, parts: list[str], value: Any) -> None:
    node, last = _parent(doc, parts, "add")
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and (last == "-" or (last.isdigit() and int(last) <= len(node))):
        node.insert(len(node) if last == "-" else int(last), value)
    else:
        raise Unprocessable("add: bad target", location="/" + "/".join(parts))


def _remove(doc: Any, parts: list[str]) -> None:
    node, last = _parent(doc, parts, "remove")
    if isinstance(node, dict) and last in node:
        del node[last]
    elif isinstance(node, list) and last.isdigit() and int(last) < len(node):
        del node[int(last)]
    else:
        raise Unprocessable("remove: path does not exist", location="/" + "/".join(parts))


_ARCHIVE_PATH = re.compile(r"^DocumentReference\.extension\.where\(url\s*=\s*'([^']+)'\)(?:\.value)?$")


def fhirpath_patch(doc: dict[str, Any], parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The FHIRPath Patch forms PDSm uses (a Parameters resource) on status, securityLabel, archive."""
    out: dict[str, Any] = orjson.loads(orjson.dumps(doc))
    for param in parameters.get("parameter") or ():
        if not isinstance(param, dict) or param.get("name") != "operation":
            raise BadRequest("a FHIRPath Patch holds operation parameters")
        parts = {p.get("name"): p for p in param.get("part") or () if isinstance(p, dict)}
        kind = (parts.get("type") or {}).get("valueCode")
        path = str((parts.get("path") or {}).get("valueString", ""))
        name = (parts.get("name") or {}).get("valueString")
        value_part = parts.get("value") or {}
        value = next((v for k, v in value_part.items() if k.startswith("value")), None)
        archive = _ARCHIVE_PATH.match(path)
        if path == "DocumentReference.status" and kind == "replace":
            out["status"] = value
        elif path == "DocumentReference.securityLabel" and kind == "replace":
            out["securityLabel"] = [value]
        elif path == "DocumentReference.securityLabel" and kind == "delete":
            out.pop("securityLabel", None)
        elif path == "DocumentReference" and kind == "add" and name == "securityLabel":
            out.setdefault("securityLabel", []).append(value)
        elif archive and archive[1] == IS_ARCHIVED and kind in ("replace", "add"):
            _set_archived(out, value is True)
        else:
            raise MethodNotAllowed(
                f"FHIRPath Patch {kind} on {path or name!r}: only status, securityLabel and"
                " the isArchived extension may change",
                location=path or "parameter",
            )
    return out


def _set_archived(doc: dict[str, Any], value: bool) -> None:
    exts = [
        e for e in doc.get("extension") or () if not (isinstance(e, dict) and e.get("url") == IS_ARCHIVED)
    ]
    exts.append({"url": IS_ARCHIVED, "valueBoolean": value})
    doc["extension"] = exts


def _fixed_part(doc: Mapping[str, Any]) -> dict[str, Any]:
    """What a metadata update may not change: everything but status, securityLabel, isArchived."""
    out = {k: v for k, v in doc.items() if k not in ("status", "securityLabel", "meta")}
    exts = [
        e for e in doc.get("extension") or () if not (isinstance(e, dict) and e.get("url") == IS_ARCHIVED)
    ]
    out.pop("extension", None)
    if exts:
        out["extension"] = exts
    return out


def check_metadata_update(before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    """405 when the update changes more than status, securityLabel and isArchived; 422 for a status
    that is not a document status."""
    if _fixed_part(before) != _fixed_part(after):
        changed = sorted(
            k for k in set(before) | set(after) if k not in ("meta",) and before.get(k) != after.get(k)
        )
        raise MethodNotAllowed(
            "only status, securityLabel and the isArchived extension may be updated"
            f" (this update changes {', '.join(changed) or 'other elements'})",
            location=f"DocumentReference.{changed[0]}" if changed else "DocumentReference",
        )
    if after.get("status") not in STATUSES:
        raise Unprocessable(
            f"status must be one of {', '.join(STATUSES)}", location="DocumentReference.status"
        )
