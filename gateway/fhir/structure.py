"""A fast structural check of FHIR R4B JSON, compiled from the fhir.resources R4B models themselves.

Building pydantic models costs 0.3–0.6 ms per resource; most resources the gateway sees are
valid, and only need a yes. :func:`conforms` answers that yes from a small table per model class
(element names, list or single, required elements, choice groups, primitive rules, the closed
code bindings), built on first use from the classes' ``model_fields`` and cached.

It is one-sided by design: ``True`` means fhir.resources R4B accepts the resource (and, with
``bindings=True``, every code inside a closed ``enum_values`` list is one of them). ``False``
means "invalid or not sure": the caller then runs fhir.resources, which gives the verdict and
the detailed messages. Anything the table does not model exactly answers ``False``, so the
verdict of check-then-fallback is always fhir.resources' own:

- values pydantic would coerce in lax mode ("true" for a boolean, "3" for an integer, a number
  as a string for a decimal is kept: that one fhir.resources checks with a regex of its own);
- ``null`` anywhere, keys spelt as Python field names (``birthDate__ext``), ``fhir_comments``,
  ``resourceType`` inside a data type, contained resources without ``resourceType``;
- ``uuid`` elements and lenient base64 (whitespace, missing padding).
"""

from __future__ import annotations

import datetime
import functools
import re
import typing
from collections.abc import Callable, Mapping
from typing import Any, Final

from fhir.resources.R4B import get_fhir_model_class
from fhir_core import constraints as fhir_constraints
from fhir_core import types as fhir_types
from fhir_core.fhirabstractmodel import FHIRAbstractModel
from fhir_core.types import FhirBase, FhirElementOrResourceBase
from fhir_core.utils import get_fhir_type_name, is_list_type, is_primitive_type

Check = Callable[[Any], bool]
# What ``conforms`` checks codes against: nothing (False), every closed ``enum_values`` list (True),
# or the codes a function gives for (model class, element alias, field info), None for none.
CodeCheck = bool | Callable[[Any, str, Any], "tuple[str, ...] | None"]

_PREFIX: Final = "R4B."

# -- primitives ------------------------------------------------------------------------------------
# Each rule accepts a subset of what fhir_core + pydantic accept for that FHIR type.


def _never(value: Any) -> bool:
    return False


# A lone surrogate cannot cross into pydantic's Rust core: every string type refuses it.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: Any) -> bool:
    return type(value) is str and (value.isascii() or _SURROGATE.search(value) is None)


def _is_str(value: Any) -> bool:
    return type(value) is str


def _is_bool(value: Any) -> bool:
    return type(value) is bool


# pydantic runs the models' patterns with Rust's regex (unanchored search). Every character
# Python's re sees as non-space is non-space for Rust too, so these Python forms are never
# more lenient.
_STRING = re.compile(r"[ \r\n\t\S]")
_CODE = re.compile(r"[^\s]+(?:\s[^\s]+)*")
_ID = re.compile(r"[A-Za-z0-9\-.]+")
_OID = re.compile(r"urn:oid:[0-2](?:\.(?:0|[1-9][0-9]*))+")
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
# fhir_core's own regexes for numbers and dates (the same objects it matches with).
_DECIMAL = fhir_types.Decimal.pattern
_DATE = fhir_types.Date.pattern
_DATETIME = fhir_types.DateTime.pattern
_INSTANT = fhir_types.Instant.pattern
_TIME = fhir_types.Time.pattern
_ID_MAX = fhir_constraints.TYPES_ID_MAX_LENGTH


def _string(value: Any) -> bool:
    return _text(value) and _STRING.search(value) is not None


def _code(value: Any) -> bool:
    return _text(value) and _CODE.fullmatch(value) is not None


def _id(value: Any) -> bool:
    return (
        type(value) is str and (_ID_MAX is None or len(value) <= _ID_MAX) and _ID.fullmatch(value) is not None
    )


def _oid(value: Any) -> bool:
    return type(value) is str and _OID.fullmatch(value) is not None


def _int_range(low: int, high: int) -> Check:
    def check(value: Any) -> bool:
        return type(value) is int and low <= value <= high

    return check


def _decimal(value: Any) -> bool:
    # fhir_core matches str(value) against its regex and builds a Decimal from it, nothing more.
    kind = type(value)
    return (kind is int or kind is float or kind is str) and _DECIMAL.fullmatch(str(value)) is not None


def _json_decimal(value: Any) -> bool:
    return type(value) is not str and _decimal(value)


def _calendar_date(text: str) -> bool:
    try:
        datetime.date(int(text[0:4]), int(text[5:7]), int(text[8:10]))
    except ValueError:
        return False
    return True


def _date(value: Any) -> bool:
    if type(value) is not str or _DATE.fullmatch(value) is None:
        return False
    return len(value) < 10 or _calendar_date(value)


def _datetime(value: Any) -> bool:
    if type(value) is not str or _DATETIME.fullmatch(value) is None:
        return False
    if len(value) < 10:
        return True  # a year or a year-month: fhir_core keeps the string
    return _calendar_date(value)


def _instant(value: Any) -> bool:
    return type(value) is str and _INSTANT.fullmatch(value) is not None and _calendar_date(value)


def _time(value: Any) -> bool:
    return type(value) is str and _TIME.fullmatch(value) is not None


def _base64(value: Any) -> bool:
    # canonical, padded base64 only; pydantic's decoder also takes what it can repair
    return type(value) is str and _BASE64.fullmatch(value) is not None


_PRIMITIVES: Final[dict[str, Check]] = {
    "boolean": _is_bool,
    "string": _string,
    "code": _code,
    "id": _id,
    "uri": _text,
    "canonical": _text,
    "url": _is_str,  # url and xhtml, alone, let a lone surrogate through
    "markdown": _text,
    "xhtml": _is_str,
    "oid": _oid,
    "integer": _int_range(-2147483648, 2147483647),
    "unsignedInt": _int_range(0, 2147483647),
    "positiveInt": _int_range(1, 2147483647),
    "decimal": _decimal,
    "date": _date,
    "dateTime": _datetime,
    "instant": _instant,
    "time": _time,
    "base64Binary": _base64,
    # uuid (UUID4 in pydantic) is left to fhir.resources.
}

PRIMITIVE_KINDS: Final = frozenset(_PRIMITIVES)


def primitive(kind: str) -> Check:
    """The rule for one FHIR primitive type (one that says no to everything for unknown kinds)."""
    return _PRIMITIVES.get(kind, _never)


def _list_of(item: Check) -> Check:
    def check(value: Any) -> bool:
        if type(value) is not list:
            return False
        for x in value:  # noqa: SIM110 - a plain loop beats all() over a generator here
            if not item(x):
                return False
        return True

    return check


# -- models ----------------------------------------------------------------------------------------


class _Model:
    """The compiled check of one model class (built on first call, so recursive types work)."""

    __slots__ = ("_bindings", "_choices", "_cls", "_fields", "_needs_one", "_required", "_required_ext")

    def __init__(self, cls: type[FHIRAbstractModel], bindings: CodeCheck) -> None:
        self._cls = cls
        self._bindings = bindings
        self._fields: dict[str, Check] | None = None
        self._required: tuple[str, ...] = ()
        self._required_ext: tuple[tuple[str, str], ...] = ()
        self._choices: tuple[tuple[frozenset[str], bool], ...] = ()
        self._needs_one: tuple[str, ...] = ()

    def __call__(self, value: Any) -> bool:
        if type(value) is not dict:
            return False
        fields = self._fields
        if fields is None:
            fields = self._compile()
        for key, item in value.items():
            check = fields.get(key)
            if check is None or not check(item):
                return False
        for key in self._required:
            if key not in value:
                return False
        for key, ext in self._required_ext:
            if key not in value:
                # fhir_core accepts a required primitive carried only by its extensions.
                carrier = value.get(ext)
                if carrier is None or not carrier.get("extension"):
                    return False
        for group, required in self._choices:
            found = 0
            for key in group:
                if key in value:
                    found += 1
            if found > 1 or (required and not found):
                return False
        if self._needs_one:
            # FHIRPrimitiveExtension's own rule: an id or an extension (or comments) must be there.
            return any(key in value for key in self._needs_one)
        return True

    def _compile(self) -> dict[str, Check]:
        cls = self._cls
        fields: dict[str, Check] = {}
        aliases: dict[str, str] = {}
        for name, info in cls.model_fields.items():
            alias = info.alias or name
            aliases[name] = alias
            if name == "fhir_comments":
                continue  # left to fhir.resources
            fields[alias] = _field_check(info, self._bindings, cls, alias)
        if cls.has_resource_base():
            rtype = cls.get_resource_type()
            fields["resourceType"] = functools.partial(_equals, rtype)
        self._required = tuple(
            aliases[name]
            for name, info in cls.model_fields.items()
            if info.is_required() and name != "fhir_comments"
        )
        # These two are instance methods that read no instance state.
        required_prims = cls.get_required_fields(typing.cast(Any, None))
        self._required_ext = tuple(
            (element, aliases.get(ext, "") if ext else "") for element, ext in required_prims
        )
        choices = cls.get_one_of_many_fields(typing.cast(Any, None))
        groups = []
        for names in choices.values():
            first = cls.model_fields[names[0]].json_schema_extra
            required = isinstance(first, dict) and first.get("one_of_many_required") is True
            groups.append((frozenset(aliases[n] for n in names), required))
        self._choices = tuple(groups)
        if cls.__name__ == "FHIRPrimitiveExtension":
            self._needs_one = ("id", "extension")
        self._fields = fields
        return fields


def _equals(expected: str, value: Any) -> bool:
    return type(value) is str and value == expected


def _field_check(info: Any, bindings: CodeCheck, owner: Any = None, alias: str = "") -> Check:
    if is_primitive_type(info):
        try:
            kind = get_fhir_type_name(info, _PREFIX)
        except ValueError:
            return _never
        one = _PRIMITIVES.get(kind, _never)
        if callable(bindings):  # the REST check: FHIR JSON's own types, so no decimal as a string
            if kind == "decimal":
                one = _json_decimal
            codes = bindings(owner, alias, info)
            if codes:
                one = functools.partial(_one_of, one, frozenset(codes))
        elif bindings and kind == "code":
            extra = info.json_schema_extra
            allowed = extra.get("enum_values") if isinstance(extra, dict) else None
            # "+" marks an open list: nothing to enforce (as the REST API does).
            if isinstance(allowed, list) and allowed and "+" not in allowed:
                one = functools.partial(_code_in, frozenset(allowed))
    else:
        base = fhir_base(info.annotation)
        if base is None:
            return _never
        if issubclass(base, FhirElementOrResourceBase):
            if base.get_model_klass().__name__ != "Resource":
                return _never
            one = _any_resource(bindings)
        else:
            one = _model(base.get_model_klass(), bindings)
    return _list_of(one) if is_list_type(info) else one


def _code_in(allowed: frozenset[str], value: Any) -> bool:
    return _code(value) and value in allowed


def _one_of(check: Check, allowed: frozenset[str], value: Any) -> bool:
    return check(value) and value in allowed


def fhir_base(annotation: Any) -> type[FhirBase] | None:
    """The FHIR type a model field's annotation names (inside Optional, list…), None if none."""
    if isinstance(annotation, type) and issubclass(annotation, FhirBase):
        return annotation
    for arg in typing.get_args(annotation):
        found = fhir_base(arg)
        if found is not None:
            return found
    return None


def _model(cls: type[FHIRAbstractModel], bindings: CodeCheck) -> _Model:
    key = (cls, bindings)
    found = _MODELS.get(key)
    if found is None:
        found = _MODELS[key] = _Model(cls, bindings)
    return found


_MODELS: dict[tuple[type[FHIRAbstractModel], CodeCheck], _Model] = {}


@functools.cache
def _resource_class(rtype: str) -> type[FHIRAbstractModel] | None:
    """The model of a concrete R4B resource type, None for anything else."""
    if rtype in ("Resource", "DomainResource") or not rtype.isalnum():
        return None
    try:
        cls = get_fhir_model_class(rtype)
    except (KeyError, ValueError, ImportError):
        return None
    if not (isinstance(cls, type) and issubclass(cls, FHIRAbstractModel) and cls.has_resource_base()):
        return None
    return cls


def _any_resource(bindings: CodeCheck) -> Check:
    """A contained / entry resource: checked as the type its resourceType names."""

    def check(value: Any) -> bool:
        if type(value) is not dict:
            return False
        rtype = value.get("resourceType")
        if type(rtype) is not str:
            return False
        cls = _resource_class(rtype)
        return cls is not None and _model(cls, bindings)(value)

    return check


@functools.cache
def choice_siblings(rtype: str) -> Mapping[str, frozenset[str]]:
    """For each top-level element of a choice (``deceasedBoolean``), the other names of its choice
    (``deceasedDateTime``): a resource holds one of them."""
    cls = _resource_class(rtype)
    if cls is None:
        return {}
    aliases = {name: info.alias or name for name, info in cls.model_fields.items()}
    out: dict[str, frozenset[str]] = {}
    for names in cls.get_one_of_many_fields(typing.cast(Any, None)).values():
        group = frozenset(aliases[n] for n in names)
        for alias in group:
            out[alias] = group - {alias}
    return out


def conforms(resource: Mapping[str, Any], *, bindings: CodeCheck = False) -> bool:
    """True only when fhir.resources R4B accepts ``resource`` (a JSON object with a resourceType).

    With ``bindings`` True, every code under a closed ``enum_values`` list must also be one of
    them; with a function, every element it gives codes for (gateway.fhir.validation's
    required bindings).
    False means invalid *or* not decided here: ask fhir.resources for the verdict and messages.
    """
    if type(resource) is not dict:
        return False
    rtype = resource.get("resourceType")
    if type(rtype) is not str:
        return False
    cls = _resource_class(rtype)
    return cls is not None and _model(cls, bindings)(resource)
