"""What the document store speaks in: the PDSm / MHD / NOS codes it knows, the actor a call acts
for, the values it answers with, and the ``DocumentStore`` protocol."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from gateway.store.fhir_common import SearchResult

# PDSm / MHD / NOS facts (see the project's French interoperability notes).
IS_ARCHIVED = "https://interop.esante.gouv.fr/ig/fhir/pdsm/StructureDefinition/pdsm-ext-is-archived"
VISIBILITY = (
    "https://mos.esante.gouv.fr/NOS/TRE_A07-StatutVisibiliteDocument/FHIR/TRE-A07-StatutVisibiliteDocument"
)
MHD_LIST_TYPES = "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes"
URI_SYSTEM = "urn:ietf:rfc:3986"

# One bit per TRE_A07 visibility code; an Actor hides the bits of its audience.
MASQUE_PS = 1  # hidden from health professionals
INVISIBLE_PATIENT = 2
INVISIBLE_REPRESENTANTS_LEGAUX = 4
MASQUE_PSOCIAL = 8  # hidden from social-sector professionals
MASQUE_PT = 16  # hidden from third parties
MASK_BITS = {
    "MASQUE_PS": MASQUE_PS,
    "INVISIBLE_PATIENT": INVISIBLE_PATIENT,
    "INVISIBLE_REPRESENTANTS_LEGAUX": INVISIBLE_REPRESENTANTS_LEGAUX,
    "MASQUE_PSOCIAL": MASQUE_PSOCIAL,
    "MASQUE_PT": MASQUE_PT,
}
STATUSES = ("current", "superseded", "entered-in-error")


class Mode(StrEnum):
    PDSM = "pdsm"  # value sets preferred: unknown codes are warnings
    DMP = "dmp"  # DMP value sets enforced: unknown codes are 422


@dataclass(frozen=True, slots=True)
class Actor:
    """Who a store call acts for, in the store's own terms (the HTTP layer maps its Caller)."""

    hidden: int = 0  # MASK_BITS this actor must never see
    patients: tuple[str, ...] | None = None  # "system|value" identifiers it may see; None = all
    practitioner: str | None = None  # its practitioner identifier ("system|value" or value)
    may_delete_any: bool = False  # the gateway's own feed, administrators
    subject: str = "feed"  # an opaque id for logs, never a name


FEED = Actor(may_delete_any=True, subject="feed")


def split_identifier(text: str) -> tuple[str | None, str]:
    """ "system|value" → (system, value); a bare value has no system (None)."""
    system, sep, value = text.rpartition("|")
    return (system or None, value) if sep else (None, text)


@dataclass(frozen=True, slots=True)
class Version:
    """One version of a resource, as the repository keeps it (``body`` None: a deletion)."""

    version: int
    last_updated: str
    body: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Retrieved:
    """ITI-68: a document's bytes and their content type."""

    data: bytes
    content_type: str


class DocumentStore(Protocol):
    """Where documents are published, found and read, with the DMP's rules (PDSm transactions)."""

    async def open(self) -> None: ...

    async def publish(self, bundle: Mapping[str, Any], actor: Actor) -> dict[str, Any]:
        """ITI-65: a transaction Bundle → its transaction-response, all or nothing."""
        ...

    async def publish_document(
        self, resource: Mapping[str, Any], actor: Actor
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """ITI-105: one DocumentReference with ``attachment.data`` → (stored, warnings)."""
        ...

    async def search(self, params: Sequence[tuple[str, str]], actor: Actor) -> SearchResult: ...

    async def search_lists(self, params: Sequence[tuple[str, str]], actor: Actor) -> SearchResult: ...

    async def read(self, id_: str, actor: Actor) -> dict[str, Any] | None: ...

    async def retrieve(self, binary_id: str, actor: Actor) -> Retrieved | None: ...

    async def patch(self, target: str, operations: Any, actor: Actor) -> dict[str, Any]:
        """Metadata update: ``target`` is an id or ``?criteria``; JSON Patch operations."""
        ...

    async def delete(self, id_: str, actor: Actor) -> dict[str, Any]:
        """Logical delete (status entered-in-error), by the document's author only."""
        ...
