"""What each caller may read and change through the generic /fhir routes.

=============  ===========================================================================
role           on the generic /fhir routes (read, search, create, update, delete, Bundles)
=============  ===========================================================================
patient        reads and searches inside their own Patient compartment; no writes (documents
               are published with ITI-65 / ITI-105, which check whose record it is)
professional   reads, searches and writes; DocumentReference, List and Binary keep the
               document store's rules (masking, store-managed Lists and Binaries)
operator       reads and searches only (the console and /api are its tools)
admin          everything the repository allows
=============  ===========================================================================

The Patient compartment follows FHIR R4's ``CompartmentDefinition/patient``, restricted to the
types whose link to the patient the repository indexes (a ``patient`` element, or a ``subject``
that is a Patient): a patient's search gets one more criterion, so that totals and paging count
only what the caller may see. A type outside the compartment answers 403; a resource outside
it answers 404, exactly as an absent one, and so does a deleted one (410 would tell it existed).

The filter is made of ordinary search parameters (``identifier`` on Patient,
``patient.identifier`` elsewhere), so it holds on every repository backend.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from aiohttp import web

from gateway.core.errors import Forbidden, MethodNotAllowed, NotFound
from gateway.fhir.resource import ID_RE
from gateway.fhir.search import MAX_COUNT, split_value, unescape
from gateway.http.auth import Caller, Role, caller_of
from gateway.store.documents import MHD_LIST_TYPES
from gateway.store.fhir_common import FhirRepository, SearchResult, index_rows

# FHIR R4 (4.0.1) Patient compartment: the member types linked through ``patient`` or
# ``subject``, kept when the R4B model has that element (what the search index records).
# Left out: AuditEvent (its own route, operators only), and EnrollmentRequest, Person,
# Provenance, SupplyRequest (linked through elements the index does not keep).
COMPARTMENT_TYPES: frozenset[str] = frozenset(
    [
        "Account",
        "AdverseEvent",
        "AllergyIntolerance",
        "Basic",
        "BodyStructure",
        "CarePlan",
        "CareTeam",
        "ChargeItem",
        "Claim",
        "ClaimResponse",
        "ClinicalImpression",
        "Communication",
        "CommunicationRequest",
        "Composition",
        "Condition",
        "Consent",
        "CoverageEligibilityRequest",
        "CoverageEligibilityResponse",
        "DetectedIssue",
        "DeviceRequest",
        "DeviceUseStatement",
        "DiagnosticReport",
        "DocumentManifest",
        "DocumentReference",
        "Encounter",
        "EpisodeOfCare",
        "ExplanationOfBenefit",
        "FamilyMemberHistory",
        "Flag",
        "Goal",
        "ImagingStudy",
        "Immunization",
        "ImmunizationEvaluation",
        "ImmunizationRecommendation",
        "Invoice",
        "List",
        "MeasureReport",
        "Media",
        "MedicationAdministration",
        "MedicationDispense",
        "MedicationRequest",
        "MedicationStatement",
        "MolecularSequence",
        "NutritionOrder",
        "Observation",
        "Procedure",
        "QuestionnaireResponse",
        "RelatedPerson",
        "RequestGroup",
        "RiskAssessment",
        "ServiceRequest",
        "Specimen",
        "SupplyDelivery",
        "VisionPrescription",
    ]
)
DOCUMENT_TYPES = frozenset({"DocumentReference", "List", "Binary"})
# Search parameters that name a patient, per searched type.
_NAMING_REFERENCES = ("patient", "subject")
_NAMING_TOKENS = ("patient.identifier", "subject.identifier")
# "Type/id" at the end of a reference (possibly absolute, possibly versioned).
_REFERENCE = re.compile(r"(?:^|/)([A-Z][A-Za-z]{0,63})/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]*)?$")


class DocumentRules(Protocol):
    """The document store's view, for documents met on the generic routes (set by the MHD routes)."""

    async def visible(self, request: web.Request, resource: Mapping[str, Any]) -> bool:
        """Whether this request's caller may see this DocumentReference, List or Binary."""
        ...

    async def managed(self, type_: str, id_: str) -> bool:
        """Whether this List or Binary belongs to a published document (changed only through MHD)."""
        ...

    async def view(self, request: web.Request, resource: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The resource as this request's caller may be shown it (a List without the entries that
        name documents hidden from it), None when it may not be shown at all."""
        ...


DOCUMENT_RULES: web.AppKey[DocumentRules] = web.AppKey("document_rules", DocumentRules)


def _escape(text: str) -> str:
    out = text
    for ch in ("\\", ",", "|", "$"):
        out = out.replace(ch, "\\" + ch)
    return out


def _pair(text: str) -> tuple[str | None, str]:
    """A caller's "system|value" (or bare value) identifier."""
    system, sep, value = text.rpartition("|")
    return (system or None, value) if sep else (None, text)


@dataclass(frozen=True, slots=True)
class Compartment:
    """A patient caller's compartment: their identifiers and the Patients that carry them."""

    identifiers: tuple[tuple[str | None, str], ...]
    patients: frozenset[str]  # Patient ids

    def criterion(self, type_: str) -> tuple[str, str]:
        """The search parameter that keeps a search of ``type_`` inside the compartment."""
        tokens = ",".join(f"{_escape(s)}|{_escape(v)}" if s else _escape(v) for s, v in self.identifiers)
        return ("identifier" if type_ == "Patient" else "patient.identifier", tokens)

    def holds(self, resource: Mapping[str, Any]) -> bool:
        type_, id_ = resource.get("resourceType"), resource.get("id")
        if not isinstance(type_, str) or not isinstance(id_, str):
            return False
        if type_ == "Patient":
            return id_ in self.patients
        if type_ not in COMPARTMENT_TYPES:
            return False
        mine = {f"Patient/{p}" for p in self.patients}
        return any(row[2] == "patient" and row[4] in mine for row in index_rows(type_, id_, resource))

    def _own_token(self, token: str) -> bool:
        parts = [unescape(p) for p in split_value(token, "|")]
        if len(parts) == 1:
            return any(parts[0] == v for _, v in self.identifiers)
        if len(parts) != 2:
            return False
        system, value = parts
        return any(value == v and (not system or s is None or system == s) for s, v in self.identifiers)

    def _own_reference(self, value: str) -> bool:
        text = unescape(value)
        if ID_RE.fullmatch(text):
            return text in self.patients  # a bare id may stand for a Patient: it must be one of theirs
        match = _REFERENCE.search(text)
        # Another type (or no reference at all: the repository answers 400) names no patient.
        return match is None or match[1] != "Patient" or match[2] in self.patients

    def check(self, type_: str, params: Iterable[tuple[str, str]]) -> None:
        """403 when a search names a patient other than the caller's own (whether it exists or not)."""
        for name, raw in params:
            values = [v for v in split_value(raw, ",") if v]
            if type_ == "Patient" and name == "_id":
                bad = [v for v in values if unescape(v) not in self.patients]
            elif (type_ == "Patient" and name == "identifier") or name in _NAMING_TOKENS:
                bad = [v for v in values if not self._own_token(v)]
            elif name in _NAMING_REFERENCES:
                bad = [v for v in values if not self._own_reference(v)]
            else:
                continue
            if bad:
                raise Forbidden("a patient searches their own record only", location=name)


# One lookup of the caller's Patients per request (a Bundle reads many entries).
_COMPARTMENT: web.RequestKey[Compartment] = web.RequestKey("passerelle.compartment", Compartment)


def is_limited(caller: Caller | None) -> bool:
    """Callers the document store limits (masking codes, patient scope)."""
    return caller is not None and caller.role in (Role.PATIENT, Role.PROFESSIONAL)


async def compartment_of(request: web.Request, repo: FhirRepository, type_: str) -> Compartment | None:
    """The caller's compartment when the caller is a patient (None otherwise); 403 for the types
    a patient does not read here."""
    caller = caller_of(request)
    if caller is None or caller.role is not Role.PATIENT:
        if type_ in DOCUMENT_TYPES and is_limited(caller) and DOCUMENT_RULES not in request.app:
            raise Forbidden(f"{type_} is served by the document store, which this repository lacks")
        return None
    if type_ != "Patient" and type_ not in COMPARTMENT_TYPES:
        raise Forbidden(f"{type_} is not part of a patient's record", location="type")
    if type_ in DOCUMENT_TYPES and DOCUMENT_RULES not in request.app:
        raise Forbidden(f"{type_} is served by the document store, which this repository lacks")
    if _COMPARTMENT in request:
        return request[_COMPARTMENT]
    identifiers = tuple(_pair(p) for p in caller.patients if p)
    if not identifiers:
        raise Forbidden("this credential names no patient record")
    partial = Compartment(identifiers, frozenset())
    result = await repo.search("Patient", [partial.criterion("Patient")], count=MAX_COUNT)
    compartment = Compartment(identifiers, frozenset(str(r["id"]) for r in result.matches))
    request[_COMPARTMENT] = compartment
    return compartment


async def may_see(request: web.Request, resource: Mapping[str, Any], compartment: Compartment | None) -> bool:
    """Whether a resource met on the way (an ``_include``, a Bundle entry) may be shown."""
    if compartment is not None and not compartment.holds(resource):
        return False
    if resource.get("resourceType") in DOCUMENT_TYPES and is_limited(caller_of(request)):
        rules = request.app.get(DOCUMENT_RULES)
        return rules is not None and await rules.visible(request, resource)
    return True


async def shown(
    request: web.Request, resource: Mapping[str, Any], compartment: Compartment | None = None
) -> Mapping[str, Any] | None:
    """A resource met on the way as the caller may be shown it (``DocumentRules.view`` for the
    document types), None when it may not be shown."""
    if compartment is not None and not compartment.holds(resource):
        return None
    if resource.get("resourceType") in DOCUMENT_TYPES and is_limited(caller_of(request)):
        rules = request.app.get(DOCUMENT_RULES)
        return await rules.view(request, resource) if rules is not None else None
    return resource


async def visible_included(
    request: web.Request, result: SearchResult, compartment: Compartment | None
) -> SearchResult:
    """``_include``d resources the caller may not see are left out (matches were filtered in the query)."""
    if not result.included or (compartment is None and not is_limited(caller_of(request))):
        return result
    kept = [dict(v) for r in result.included if (v := await shown(request, r, compartment)) is not None]
    return replace(result, included=kept) if kept != result.included else result


# -- writes -------------------------------------------------------------------------------------


def check_writer(request: web.Request) -> None:
    """Patients and operators do not write through the generic routes (403)."""
    caller = caller_of(request)
    if caller is None:
        return
    if caller.role is Role.PATIENT:
        raise Forbidden("a patient publishes documents with ITI-65 or ITI-105; other writes are not theirs")
    if caller.role is Role.OPERATOR:
        raise Forbidden("the operator role reads /fhir; writing needs a professional or admin credential")


def is_mhd_list(resource: Mapping[str, Any] | None) -> bool:
    if not isinstance(resource, Mapping) or resource.get("resourceType") != "List":
        return False
    code = resource.get("code")
    codings = code.get("coding") if isinstance(code, Mapping) else None
    return any(isinstance(c, Mapping) and c.get("system") == MHD_LIST_TYPES for c in codings or ())


async def check_document_write(
    request: web.Request,
    repo: FhirRepository,
    type_: str,
    *,
    id_: str | None = None,
    query: Sequence[tuple[str, str]] | None = None,
    resource: Mapping[str, Any] | None = None,
    where: str | None = None,
) -> None:
    """Documents, and a published document's Lists and Binaries, change through MHD only (405),
    whoever asks: a generic write (a batch entry, say) would skip masking, author-only delete and
    the document index. AuditEvents are written by the gateway's hash-chained trail only."""
    if type_ == "AuditEvent":
        raise MethodNotAllowed("the audit trail is append-only and written by the gateway", location=where)
    if type_ not in DOCUMENT_TYPES:
        return
    if is_mhd_list(resource):
        raise MethodNotAllowed("SubmissionSets and Folders are published with ITI-65", location=where)
    rules = request.app.get(DOCUMENT_RULES)
    if rules is None:
        return  # no document store: nothing is published
    if type_ == "DocumentReference":
        raise MethodNotAllowed(
            "a DocumentReference is published with ITI-65 or ITI-105 and changed by the metadata"
            " update (PATCH) or deleted by its author, not by a generic write",
            location=where,
        )
    targets = [id_] if id_ is not None and ID_RE.fullmatch(id_) else []
    if query:
        criteria = [(k, v) for k, v in query if k not in ("_count", "_offset", "_sort", "_include")]
        found = await repo.search(type_, [*criteria, ("_count", "2")])
        targets += [str(r["id"]) for r in found.matches]
    for target in targets:
        if await rules.managed(type_, target):
            raise MethodNotAllowed(
                f"{type_}/{target} belongs to a published document: it changes through ITI-65"
                " (replacement) or the metadata update, not here",
                location=where,
            )


def not_found(type_: str, id_: str) -> NotFound:
    return NotFound(f"{type_}/{id_} is not known")
