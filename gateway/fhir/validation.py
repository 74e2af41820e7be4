"""The one validation every resource written through /fhir passes, whichever way it comes in.

Generic create, update, conditional update, transaction and batch entries, ITI-65 and ITI-105
publications, the documents a metadata update makes and every mapped Bundle all go through
``validate_resource`` (and its fast yes, ``conforms_fast``), so that what the repository stores
reads back as valid FHIR for every client. Each caller says whether required bindings are checked
(``Bindings``); today every one of them checks them:

- structure, cardinalities and formats: the ``fhir.resources`` R4B models;
- primitive types as FHIR JSON spells them: a boolean is ``true``/``false``, an integer a JSON
  integer, a decimal a JSON number, everything else a string. The models are lax (pydantic takes
  ``"yes"`` for ``true`` and ``"3"`` for ``3``); a client reading the value back is not;
- required bindings: codes outside the value set are refused. The models carry each element's
  short list of codes; where that list is the whole value set it is used as it is
  (``closed_codes``), where it is abbreviated ("registered | preliminary | final | amended +")
  the full value set is written out below (``REQUIRED_BINDINGS``), and the lists that are only
  examples of open code systems are named (``OPEN_CODE_LISTS``). A test walks every model and
  fails on a coded element that none of the three accounts for.

The compiled check of gateway.fhir.structure gives the models' yes in microseconds; a walk of
the JSON (cheaper still) then checks primitive JSON types and every required binding. What the
compiled check does not accept is judged by the models themselves; every problem is reported
with its location.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from fhir_core.types import FhirElementOrResourceBase
from fhir_core.utils import get_fhir_type_name, is_primitive_type

from gateway.core.errors import BadRequest, NotFound, Unprocessable
from gateway.fhir.outcome import issue, outcome
from gateway.fhir.resource import TYPE_RE
from gateway.fhir.structure import CodeCheck, conforms, fhir_base


class Bindings(enum.Enum):
    """Whether codes must be in the value set of their element's required binding."""

    REQUIRED = "required"  # codes outside it are refused
    UNCHECKED = "unchecked"  # structure and FHIR JSON types only


# -- the value sets --------------------------------------------------------------------------------

_OBSERVATION_STATUS = (
    "registered",
    "preliminary",
    "final",
    "amended",
    "corrected",
    "cancelled",
    "entered-in-error",
    "unknown",
)

# Required bindings (FHIR R4 / R4B) whose codes the models list only in part ("... +"): the whole
# value set, keyed by (model class, element).
REQUIRED_BINDINGS: dict[tuple[str, str], tuple[str, ...]] = {
    ("Observation", "status"): _OBSERVATION_STATUS,  # ObservationStatus
    ("RiskAssessment", "status"): _OBSERVATION_STATUS,
    ("DetectedIssue", "status"): _OBSERVATION_STATUS,
    ("DiagnosticReport", "status"): (  # DiagnosticReportStatus
        "registered",
        "partial",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "appended",
        "cancelled",
        "entered-in-error",
        "unknown",
    ),
    **dict.fromkeys(
        [("Encounter", "status"), ("EncounterStatusHistory", "status")],
        (  # EncounterStatus
            "planned",
            "arrived",
            "triaged",
            "in-progress",
            "onleave",
            "finished",
            "cancelled",
            "entered-in-error",
            "unknown",
        ),
    ),
    ("DeviceUseStatement", "status"): (  # DeviceUseStatementStatus
        "active",
        "completed",
        "entered-in-error",
        "intended",
        "stopped",
        "on-hold",
    ),
    ("DeviceUdiCarrier", "entryType"): (  # UDIEntryType
        "barcode",
        "rfid",
        "manual",
        "card",
        "self-reported",
        "unknown",
    ),
    ("QuestionnaireItem", "type"): (  # QuestionnaireItemType
        "group",
        "display",
        "question",
        "boolean",
        "decimal",
        "integer",
        "date",
        "dateTime",
        "time",
        "string",
        "text",
        "url",
        "choice",
        "open-choice",
        "attachment",
        "reference",
        "quantity",
    ),
    ("StructureMapGroupRuleTarget", "transform"): (  # StructureMapTransform
        "create",
        "copy",
        "truncate",
        "escape",
        "cast",
        "append",
        "translate",
        "reference",
        "dateOp",
        "uuid",
        "pointer",
        "evaluate",
        "cc",
        "c",
        "qty",
        "id",
        "cp",
    ),
    ("SupplyRequest", "status"): (  # SupplyRequestStatus
        "draft",
        "active",
        "suspended",
        "cancelled",
        "completed",
        "entered-in-error",
        "unknown",
    ),
    ("Task", "status"): (  # TaskStatus
        "draft",
        "requested",
        "received",
        "accepted",
        "rejected",
        "ready",
        "cancelled",
        "in-progress",
        "on-hold",
        "failed",
        "completed",
        "entered-in-error",
    ),
}

# Coded elements whose short list is examples only: an extensible binding (Expression.language)
# and MIME types (CapabilityStatement.format). Not checked.
OPEN_CODE_LISTS: frozenset[tuple[str, str]] = frozenset(
    {("Expression", "language"), ("CapabilityStatement", "format")}
)


def closed_codes(info: Any) -> tuple[str, ...] | None:
    """The codes of a required binding to a closed list, None when the element's list is open.

    The models take ``enum_values`` from the element's short text: "a | b | c" (possibly followed
    by " - why" or " (when)") is the closed list of a required binding; "+" or "etc." mark more
    codes, and a list inside other words ("formats supported (xml | json | ttl | mime type)") is
    only examples of an open code system (MIME types there).
    """
    extra = info.json_schema_extra
    allowed = extra.get("enum_values") if isinstance(extra, dict) else None
    if not isinstance(allowed, list) or not allowed or "+" in allowed or "etc." in allowed:
        return None
    joined = " | ".join(map(str, allowed))
    title = (info.title or "").strip()
    if title != joined and not title.startswith((joined + " -", joined + " (")):
        return None
    return tuple(map(str, allowed))


def listed_codes(info: Any) -> list[str] | None:
    """The short list of codes a model element carries, if any."""
    extra = info.json_schema_extra
    allowed = extra.get("enum_values") if isinstance(extra, dict) else None
    return [str(a) for a in allowed] if isinstance(allowed, list) and allowed else None


# -- errors ----------------------------------------------------------------------------------------


class UnsupportedResourceType(NotFound):
    """A resource type this server does not know: 404, issue code ``not-supported``."""

    fhir_issue_code = "not-supported"


class InvalidResource(Unprocessable):
    """A resource the validation rejects; carries every issue found, each with its location."""

    fhir_issue_code = "invalid"

    def __init__(self, issues: list[tuple[str, str, str]]) -> None:
        # (issue code, diagnostics, FHIRPath-ish location)
        first = issues[0]
        super().__init__(
            f"{len(issues)} validation error(s); first: {first[2]}: {first[1]}", location=first[2]
        )
        self.issues = issues

    def outcome(self) -> dict[str, Any]:
        return outcome(*(issue(code, text, location=where) for code, text, where in self.issues))


# -- the models ------------------------------------------------------------------------------------


@functools.cache
def model_of(type_: str) -> Any | None:
    """The R4B model class of a concrete resource type, None when there is none."""
    if not TYPE_RE.fullmatch(type_) or type_ in ("Resource", "DomainResource"):
        return None
    try:
        cls = get_fhir_model_class(type_)
    except ValueError:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, Resource) else None


# FHIR primitive types → the JSON type FHIR JSON gives them (anything else: a string).
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "boolean": (bool,),
    "integer": (int,),
    "unsignedInt": (int,),
    "positiveInt": (int,),
    "integer64": (int,),
    "decimal": (int, float),
}
_JSON_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string"}


@dataclass(frozen=True, slots=True)
class _Element:
    primitive: str | None  # the FHIR primitive type, None for a complex one or a resource
    codes: frozenset[str] | None  # a required binding's codes
    listed: tuple[str, ...]  # the same, in the value set's order (for messages)
    model: Any | None  # the class of a complex element
    resource: bool  # a resource (contained, Bundle.entry.resource, Parameters.parameter.resource)


def binding_of(cls: Any, alias: str, info: Any) -> tuple[tuple[str, ...] | None, bool]:
    """(the codes a coded element must be one of, whether they come from REQUIRED_BINDINGS)."""
    explicit = REQUIRED_BINDINGS.get((cls.__name__, alias))
    if explicit is not None:
        return explicit, True
    return closed_codes(info), False


def required_codes(cls: Any, alias: str, info: Any) -> tuple[str, ...] | None:
    """The codes a coded element must be one of (for the compiled check), None when unbound."""
    return binding_of(cls, alias, info)[0]


@functools.cache
def _elements(cls: Any) -> dict[str, _Element]:
    out: dict[str, _Element] = {}
    for name, info in cls.model_fields.items():
        alias = info.alias or name
        if name == "fhir_comments":
            continue
        if is_primitive_type(info):
            try:
                kind = get_fhir_type_name(info, "R4B.")
            except ValueError:
                continue
            codes, _ = binding_of(cls, alias, info)
            out[alias] = _Element(kind, frozenset(codes) if codes else None, codes or (), None, False)
            continue
        base = fhir_base(info.annotation)
        if base is None:
            continue
        if issubclass(base, FhirElementOrResourceBase):
            if base.get_model_klass().__name__ == "Resource":
                out[alias] = _Element(None, None, (), None, True)
            continue
        out[alias] = _Element(None, None, (), base.get_model_klass(), False)
    return out


def _issues(cls: Any, value: Any, where: str, bindings: Bindings) -> Iterator[tuple[str, str, str]]:
    """What the models let through: primitive values of the wrong JSON type, codes outside a
    required binding. (A walk of the JSON: cheaper than the compiled structure check itself.)"""
    yield from _walk(cls, value, (where,), bindings is Bindings.REQUIRED)


def _walk(cls: Any, value: Any, at: tuple[str | int, ...], coded: bool) -> Iterator[tuple[str, str, str]]:
    # ``at``: the path so far, spelt out only for an issue (most resources have none)
    if not isinstance(value, dict):
        return
    elements = _elements(cls)
    for key, item in value.items():
        element = elements.get(key)
        if element is None:
            continue  # unknown elements, "_x" primitive extensions: the models' to judge
        many = isinstance(item, list)
        items = item if many else (item,)
        primitive = element.primitive
        if primitive is not None:
            expected = _JSON_TYPES.get(primitive, (str,))
            codes = element.codes if coded else None
            for i, one in enumerate(items):
                if one is None:
                    continue
                if type(one) not in expected:
                    spelt = " or ".join(_JSON_NAMES[t] for t in expected)
                    got = _JSON_NAMES.get(type(one), type(one).__name__)
                    here = _spelt((*at, key, i) if many else (*at, key))
                    yield ("value", f"a FHIR {primitive} is a JSON {spelt}, not {got}", here)
                elif codes is not None and one not in codes:
                    here = _spelt((*at, key, i) if many else (*at, key))
                    yield ("code-invalid", f"{one!r} is not one of {' | '.join(element.listed)}", here)
        elif element.resource:
            for i, one in enumerate(items):
                rtype = one.get("resourceType") if isinstance(one, dict) else None
                inner = model_of(rtype) if isinstance(rtype, str) else None
                if inner is not None:
                    yield from _walk(inner, one, (*at, key, i) if many else (*at, key), coded)
        elif element.model is not None:
            model = element.model
            for i, one in enumerate(items):
                yield from _walk(model, one, (*at, key, i) if many else (*at, key), coded)


def _spelt(at: tuple[str | int, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (p if n == 0 else f".{p}") for n, p in enumerate(at))


def _issue_code(kind: str) -> str:
    if "missing" in kind:
        return "required"
    if kind == "extra_forbidden":
        return "structure"
    return "value"


def _path(where: str, loc: tuple[Any, ...]) -> str:
    out = where
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


# -- the checks ------------------------------------------------------------------------------------


def _compiled(bindings: Bindings) -> CodeCheck:
    """What the compiled check takes for ``bindings``."""
    return required_codes if bindings is Bindings.REQUIRED else False


def conforms_fast(resource: Mapping[str, Any], *, bindings: Bindings) -> bool:
    """The quick yes (on the event loop): True only when ``validate_resource`` would accept."""
    return conforms(resource, bindings=_compiled(bindings))


def validate_resource(resource: Mapping[str, Any], where: str | None = None, *, bindings: Bindings) -> None:
    """Raise InvalidResource (422) listing every problem, or UnsupportedResourceType (404)."""
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str):
        raise BadRequest("resourceType is missing", location=f"{where}.resourceType" if where else None)
    model = model_of(rtype)
    if model is None:
        raise UnsupportedResourceType(f"resource type {rtype!r} is not supported", location=where)
    where = where or rtype
    if conforms(resource, bindings=_compiled(bindings)):  # the compiled yes: structure, JSON types, bindings
        return
    issues: list[tuple[str, str, str]] = []
    # The walk says what the models let through (JSON types, required bindings); the models judge
    # the rest, and give their own messages whenever anything is wrong.
    walked = list(_issues(model, resource, where, bindings))
    if walked or not conforms(resource):
        try:
            model.model_validate(dict(resource))
        except (AttributeError, KeyError, TypeError) as exc:
            # fhir.resources crashes on some malformed shapes (e.g. "_use": 3): a 422, not a 500.
            raise InvalidResource([("structure", "malformed element structure", where)]) from exc
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            errors = getattr(exc, "errors", None)
            if not callable(errors):
                raise InvalidResource([("invalid", str(exc), where)]) from exc
            issues = [(_issue_code(e["type"]), e["msg"], _path(where, tuple(e["loc"]))) for e in errors()]
    located = {i[2] for i in issues}
    issues += [i for i in walked if i[2] not in located]
    if issues:
        raise InvalidResource(issues)
