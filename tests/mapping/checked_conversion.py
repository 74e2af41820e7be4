"""What the tests of the clinical feeds (laboratory automation, pharmacy, problems, referrals,
document notifications) share: building a message, mapping it with the
shipped mappings, and the checks every mapped message must pass (a valid R4B Bundle, no silent
leaf by the independent checker, no key without a namespace)."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from gateway.hl7.er7 import Message
from gateway.mapping.engine import MappingResult
from gateway.mapping.namespaces import Namespaces
from gateway.mapping.validate import bundle_errors
from tests.hl7_leaves import silent_leaves, unknown_paths
from tests.mapping.test_adt import LIB, normalized, segment

__all__ = ["LIB", "convert", "entries", "key", "message", "of_type", "segment"]

# A fictional hospital of the GHT Est: its IPP domain and its order numbers have OIDs of their own.
IPP_OID = "1.2.250.1.71.4.2.2.7701"
ORDER_OID = "1.2.250.1.71.4.2.2.7702"
# The hospital declares its own numbers' namespace (namespaces.senders of config.yaml).
SENDER_SYSTEM = "https://ch-argonne.example/fhir/id"
NAMESPACES = Namespaces.from_config({"senders": {"CH-ARGONNE": {"system": SENDER_SYSTEM}}})
PID = f"PID|||778899^^^CH-ARGONNE&{IPP_OID}&ISO^PI||ROUSSEAU^Maëlle^^^^^L||19830214|F"


def message(event: str, *segments: str, sender: str = "SIL|CH-ARGONNE", control: str = "M-17-1") -> str:
    """An HL7 v2.5 message: MSH (``sender``: MSH-3|MSH-4; UNICODE UTF-8, FRA), then ``segments``."""
    msh = (
        f"MSH|^~\\&|{sender}|PASSERELLE|GHT-EST|20270315093000||{event}|{control}|P|2.5|||||FRA|UNICODE UTF-8"
    )
    return "\r".join([msh, *segments]) + "\r"


def convert(text: str, *, namespaces: Namespaces | None = None) -> MappingResult:
    """Map with the shipped mappings, then check what every output must be."""
    raw = text.encode()
    result = LIB.map(Message.decode(raw), namespaces=namespaces or NAMESPACES)
    assert bundle_errors(result.bundle) == []
    silent = silent_leaves(raw, result.bundle, result.unmapped)
    assert [f"{leaf.path}={leaf.value}" for leaf in silent] == []
    assert unknown_paths(raw, result.unmapped) == []
    assert keys_without_system(result.bundle) == []
    return result


def keys_without_system(bundle: dict[str, Any]) -> list[str]:
    """Conditional keys whose identifier token has no system (a bare value would match anyone's)."""
    bad = []
    for entry in bundle["entry"]:
        request = entry["request"]
        queries = [request["url"].partition("?")[2]] if "?" in request["url"] else []
        queries += [request["ifNoneExist"]] if "ifNoneExist" in request else []
        for query in queries:
            for part in query.split("&"):
                name, _, value = part.partition("=")
                for token in value.split(","):
                    system, bar, _ = unquote(token).partition("|")
                    if name == "identifier" and (not bar or not system):
                        bad.append(f"{request['url']}: {token}")
    return bad


def entries(result: MappingResult) -> list[dict[str, Any]]:
    """The Bundle's entries, urn:uuid fullUrls numbered in order (urn:uuid:0, 1…)."""
    return list(normalized(result)["entry"])


def key(entry: dict[str, Any]) -> str:
    """The identifier criteria an entry is written under, whatever its write policy."""
    request = entry["request"]
    return str(request.get("ifNoneExist") or request["url"].partition("?")[2])


def of_type(result: MappingResult, kind: str) -> list[dict[str, Any]]:
    return [e for e in entries(result) if e["resource"]["resourceType"] == kind]
