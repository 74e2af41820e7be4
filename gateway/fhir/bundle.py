"""The request entries of a transaction or batch Bundle, checked against FHIR's rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.core.errors import BadRequest, MethodNotAllowed
from gateway.fhir.resource import ID_RE, TYPE_RE

# FHIR's processing order inside a transaction: deletes, creates, updates, then reads.
METHOD_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3}


@dataclass(frozen=True, slots=True)
class EntryRequest:
    """What one entry asks for."""

    method: str
    type_: str
    id_: str | None
    query: str | None
    resource: dict[str, Any] | None
    full_url: str | None
    if_none_exist: str | None
    if_match: str | None
    request: dict[str, Any]  # the entry's ``request`` as sent, extensions included


def entry_request(raw: Any) -> EntryRequest:
    """One ``Bundle.entry`` → its request; anything FHIR does not allow is a BadRequest."""
    if not isinstance(raw, dict):
        raise BadRequest("an entry must be an object", location="entry")
    request = raw.get("request")
    if not isinstance(request, dict):
        raise BadRequest("entry.request is required", location="request")
    method = request.get("method")
    url = request.get("url")
    if not isinstance(method, str) or not isinstance(url, str) or not url:
        raise BadRequest("entry.request needs a method and a url", location="request")
    if method not in METHOD_ORDER:
        raise MethodNotAllowed(f"method {method} is not supported here", location="request.method")
    path, _, query = url.lstrip("/").partition("?")
    if "://" in path:  # the query may hold system URLs; only the path must be relative
        raise BadRequest("request.url must be relative (Type, Type/id or Type?query)", location="request.url")
    segments = path.split("/")
    type_ = segments[0]
    if not TYPE_RE.fullmatch(type_) or len(segments) > 2:
        raise BadRequest("request.url must be Type, Type/id or Type?query", location="request.url")
    id_ = segments[1] if len(segments) == 2 else None
    if id_ is not None and not ID_RE.fullmatch(id_):
        raise BadRequest("invalid id in request.url", location="request.url")
    resource = raw.get("resource")
    if resource is not None and not isinstance(resource, dict):
        raise BadRequest("entry.resource must be an object", location="resource")
    if method in ("POST", "PUT"):
        if resource is None:
            raise BadRequest(f"{method} needs a resource", location="resource")
        if resource.get("resourceType") != type_:
            raise BadRequest("resource.resourceType does not match request.url", location="resource")
    if method == "POST" and (id_ is not None or query):
        raise BadRequest("POST goes to Type (use ifNoneExist for a condition)", location="request.url")
    if method in ("PUT", "DELETE") and (id_ is None) == (not query):
        raise BadRequest(f"{method} goes to Type/id or Type?query", location="request.url")
    full_url = raw.get("fullUrl")
    if_none_exist = request.get("ifNoneExist")
    if_match = request.get("ifMatch")
    return EntryRequest(
        method,
        type_,
        id_,
        query or None,
        resource,
        full_url if isinstance(full_url, str) else None,
        if_none_exist if isinstance(if_none_exist, str) and if_none_exist else None,
        if_match if isinstance(if_match, str) and if_match else None,
        request,
    )
