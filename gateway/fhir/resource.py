"""A resource's identity as the RESTful API spells it: its type and id, references, versions."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from gateway.core.errors import BadRequest

# A resource type's name, as URLs and references carry it.
TYPE_RE = re.compile(r"[A-Z][A-Za-z]{0,63}")
ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
# "Type/id", possibly inside an absolute URL or followed by a version: the part naming the resource.
REFERENCE_RE = re.compile(r"(?:^|/)([A-Z][A-Za-z]{0,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]*)?$")
_VERSION_ID = re.compile(r"[0-9]{1,10}")


def reference_of(value: Any) -> str | None:
    """The "Type/id" a Reference element points at; None when it names no resource that way."""
    if not isinstance(value, dict) or not isinstance(value.get("reference"), str):
        return None
    match = REFERENCE_RE.search(value["reference"])
    return f"{match[1]}/{match[2]}" if match else None


def resource_type(resource: Mapping[str, Any]) -> str:
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not TYPE_RE.fullmatch(rtype):
        raise BadRequest("resourceType is missing or invalid", location="resourceType")
    return rtype


def etag(version: int) -> str:
    return f'W/"{version}"'


def parse_etag(value: str) -> int:
    """An If-Match value → the version it names."""
    text = value.strip()
    text = text.removeprefix("W/").strip('"')
    if not _VERSION_ID.fullmatch(text):
        raise BadRequest('If-Match: expected W/"<versionId>"', location="If-Match")
    return int(text)
