"""The compiled R4B structure check never says yes where fhir.resources says no.

The corpus is what the gateway produces (every feed's mapping output, the transaction Bundle
itself) and the conformance Patient INS. Hypothesis mutates it (dropped elements, wrong types,
bad dates/ids/codes, extra keys, lists for singles and back, both alternatives of a choice,
primitive extensions) and compares verdicts with fhir.resources; the public entry points
(Bundle validation, the REST check) must give exactly the errors fhir.resources gives.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from typing import Any

import orjson
import pydantic
import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhir_core import types as fhir_types
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conformance.suite import DATA_DIR
from gateway.fhir import structure, validation
from gateway.fhir.structure import conforms
from gateway.fhir.validation import Bindings, InvalidResource, conforms_fast, validate_resource
from gateway.hl7.er7 import Message
from gateway.http.fhir import _code_issues
from gateway.mapping.namespaces import Namespaces
from gateway.mapping.validate import bundle_errors
from tests.documents.mdm_messages import mdm
from tests.mapping.test_actors import a01_with_actors
from tests.mapping.test_adt import A01, LIB, identity_event, segment
from tests.mapping.test_adt_triggers import MOVEMENTS, message
from tests.mapping.test_oru import oru
from tests.mapping.test_oru_groups import two_orders

MSH = "MSH|^~\\&|APP|CHU-EST|PASSERELLE|GHT|20261123110000||{}|X1|P|2.5|||||FRA|UNICODE UTF-8"
PID = "PID|||552233^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^PI||GÉRARD^Zoé^^^^^L||19750425|F"
OBX_VALUES = [
    ("NM", "42"),
    ("SN", ">=^10"),
    ("SN", "^10^-^20"),
    ("SN", "^1^:^128"),
    ("ST", "positif"),
    ("TX", "ligne 1~ligne 2"),
    ("CE", "10828004^Positif^SCT"),
    ("CX", "ABC123^^^LABO"),
    ("DT", "20261120"),
    ("TS", "202611201230+0100"),
]


def _messages() -> Iterator[bytes]:
    yield (A01 + "\r").encode()
    yield (a01_with_actors() + "\r").encode()
    for trigger, kind, action, original, *_ in MOVEMENTS:
        yield (message(trigger, kind, action, original) + "\r").encode()
    yield identity_event("ADT^A40^ADT_A39", "111^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^PI").encode()
    yield identity_event("ADT^A47^ADT_A30", "111^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^PI").encode()
    obx = [
        segment("OBX", {1: str(i), 2: kind, 3: "X-1^Essai^L", 5: value, 6: "mmol/L", 11: "F"})
        for i, (kind, value) in enumerate(OBX_VALUES, 1)
    ]
    yield oru(*obx).encode()
    yield two_orders().encode()
    yield mdm("T02", "C-1", "DOC-1")
    for event, segments in [
        ("SIU^S12^SIU_S12", [segment("SCH", {2: "RDV-9^AGENDA^1.2.250.1.71.4.2.2.4455^ISO"})]),
        (
            "ORM^O01^ORM_O01",
            [
                segment("ORC", {1: "NW", 2: "CMD-77^SIH^1.2.250.1.71.4.2.2.4455^ISO"}),
                segment("OBR", {4: "24331-1^Bilan lipidique^LN"}),
            ],
        ),
        (
            "VXU^V04^VXU_V04",
            [
                segment("ORC", {3: "VAC-3^SIH^1.2.250.1.71.4.2.2.4455^ISO"}),
                segment("RXA", {3: "20261110103000", 5: "3421012^VAXIGRIPTETRA^L", 20: "CP"}),
            ],
        ),
    ]:
        yield ("\r".join([MSH.format(event), PID, *segments]) + "\r").encode()


def _build_corpus() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [orjson.loads((DATA_DIR / "fhir" / "patient-ins.json").read_bytes())]
    for raw in _messages():
        bundle = LIB.map(Message.decode(raw), namespaces=Namespaces(policy="sender")).bundle
        out.append(bundle)
        out.extend(entry["resource"] for entry in bundle["entry"])
    return out


CORPUS = _build_corpus()


def model_accepts(resource: Any) -> bool:
    try:
        model = get_fhir_model_class(resource["resourceType"])
        model.model_validate(resource)
    except (pydantic.ValidationError, KeyError, ValueError, TypeError, AttributeError):
        # fhir.resources raises KeyError on an unknown contained type, TypeError on some lists,
        # AttributeError on a primitive extension that is not an object
        return False
    return True


def codes_ok(resource: Any) -> bool:
    model = get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    return not list(_code_issues(model, resource["resourceType"]))


def test_the_corpus_covers_every_feed() -> None:
    kinds = {r["resourceType"] for r in CORPUS}
    assert {
        "Bundle",
        "Patient",
        "Encounter",
        "Observation",
        "DiagnosticReport",
        "DocumentReference",
        "Binary",
        "Appointment",
        "ServiceRequest",
        "Immunization",
        "Practitioner",
        "Organization",
    } <= kinds


@pytest.mark.parametrize("index", range(len(CORPUS)))
def test_what_the_gateway_produces_takes_the_fast_path(index: int) -> None:
    resource = CORPUS[index]
    assert model_accepts(resource)
    assert conforms(resource)
    assert conforms(resource, bindings=True)


# -- mutations -------------------------------------------------------------------------------------

WEIRD: list[Any] = [
    None,
    "",
    " ",
    "\x0c",
    "true",
    True,
    0,
    -1,
    2**31,
    1.5,
    float("nan"),
    "3",
    "5.20",
    [],
    {},
    [None],
    [{}],
    "2023-02-30",
    "2023-13",
    "2023-02-03T10:00:00",
    "2023-02-03T10:00:00+01:00",
    "2016-12-31T23:59:60Z",
    "a  b",
    "a" * 300,
    "urn:oid:1.2..3",
    "!!!!",
    "aGVsbG8",
    "aGVsbG8=",
    "zzz-not-a-code",
    {"extension": []},
    {"url": "http://example.org/x", "valueString": "y"},
    {"reference": "Patient/1"},
    {"resourceType": "Patient"},
    {"resourceType": "Nope"},
    {"coding": [{"system": "http://loinc.org", "code": "1-8"}]},
]
EXTRA_KEYS = ["foo", "_foo", "fhir_comments", "resourceType", "class_fhir", "birthDate__ext", "extension"]
CHOICE_EXTRAS: list[tuple[str, Any]] = [
    ("valueString", "x"),
    ("valueBoolean", True),
    ("valueQuantity", {"value": 1}),
    ("deceasedBoolean", False),
    ("effectiveDateTime", "2026-11-20"),
    ("multipleBirthInteger", 2),
    ("occurrenceDateTime", "2026-11-20"),
    ("occurrenceString", "hier"),
    ("onsetString", "hier"),
    ("contentString", "x"),
]
PRIMITIVE_EXT: list[Any] = [
    {"extension": [{"url": "http://example.org/x", "valueCode": "masked"}]},
    {"extension": []},
    {},
    {"id": "a"},
    [{"extension": [{"url": "http://example.org/x", "valueCode": "masked"}]}],
    [None, {"id": "a"}],
]


def _slots(value: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key-or-index) in a JSON tree."""
    if isinstance(value, dict):
        for key, item in value.items():
            out.append((value, key))
            _slots(item, out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.append((value, i))
            _slots(item, out)
    return out


@st.composite
def mutated(draw: st.DrawFn, *, only_drop: bool = False) -> dict[str, Any]:
    resource = copy.deepcopy(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(1, 3))):
        slots = [s for s in _slots(resource, []) if s[1] != "resourceType"]
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        op = (
            "drop"
            if only_drop
            else draw(
                st.sampled_from(["drop", "weird", "listify", "unlist", "extra", "choice", "ext", "ext-only"])
            )
        )
        if op == "drop":
            del container[key]
        elif op == "weird":
            container[key] = copy.deepcopy(draw(st.sampled_from(WEIRD)))
        elif op == "listify":
            container[key] = [container[key]]
        elif op == "unlist":
            if isinstance(container[key], list) and container[key]:
                container[key] = container[key][0]
        elif isinstance(container, dict):
            if op == "extra":
                extra_key = draw(st.sampled_from(EXTRA_KEYS))
                if extra_key not in container:
                    container[extra_key] = draw(st.sampled_from(["x", {}, [], 1]))
            elif op == "choice":
                extra_key, extra = draw(st.sampled_from(CHOICE_EXTRAS))
                container[extra_key] = copy.deepcopy(extra)
            elif op == "ext":
                container[f"_{key}"] = copy.deepcopy(draw(st.sampled_from(PRIMITIVE_EXT)))
            elif op == "ext-only":
                # a required primitive given only by its extensions
                container[f"_{key}"] = copy.deepcopy(PRIMITIVE_EXT[0])
                del container[key]
    return resource


SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(mutated())
def test_fast_yes_is_always_a_fhir_resources_yes(resource: dict[str, Any]) -> None:
    accepted = model_accepts(resource)
    if conforms(resource):
        assert accepted
    if conforms(resource, bindings=True):
        assert accepted and codes_ok(resource)


@SETTINGS
@given(mutated(only_drop=True))
def test_dropping_elements_gives_the_same_verdict_both_ways(resource: dict[str, Any]) -> None:
    # Required elements and choices decided by the table alone, in both directions.
    assert conforms(resource) == model_accepts(resource)


def _reference_bundle_errors(bundle: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    for i, entry in enumerate(bundle.get("entry", [])):
        resource = entry["resource"]
        try:
            model = get_fhir_model_class(resource["resourceType"])
        except ValueError:
            errors.append(f"Bundle.entry[{i}].resource: unknown resource type {resource['resourceType']!r}")
            continue
        try:
            model.model_validate(resource)
        except pydantic.ValidationError as exc:
            for err in exc.errors():
                where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
                errors.append(f"Bundle.entry[{i}].resource{where}: {err['msg']}")
        except (AttributeError, KeyError, TypeError):  # a crash of fhir.resources is a verdict too
            errors.append(f"Bundle.entry[{i}].resource: malformed element structure")
    return errors


def _reference_rest_issues(resource: dict[str, Any]) -> list[tuple[str, str, str]]:
    rtype = resource["resourceType"]
    try:
        parsed = get_fhir_model_class(rtype).model_validate(resource)
    except (AttributeError, KeyError, TypeError):  # a crash of fhir.resources is a verdict too
        return [("structure", "malformed element structure", rtype)]
    except pydantic.ValidationError as exc:
        out = []
        for e in exc.errors():
            where = rtype + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"])
            code = (
                "required"
                if "missing" in e["type"]
                else "structure"
                if e["type"] == "extra_forbidden"
                else "value"
            )
            out.append((code, e["msg"], where))
        return out
    return list(_code_issues(parsed, rtype))


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    """What a call gives, crashes included."""
    try:
        return ("returned", fn(*args))
    except InvalidResource as exc:
        return ("invalid", exc.issues)
    except (KeyError, TypeError, ValueError) as exc:
        return ("raised", type(exc).__name__)


def _reference_rest(resource: dict[str, Any]) -> None:
    issues = _reference_rest_issues(resource)
    if issues:
        raise InvalidResource(issues)


@SETTINGS
@given(mutated())
def test_bundle_validation_reports_what_fhir_resources_reports(resource: dict[str, Any]) -> None:
    """The mapping's check is the REST one (fhir.resources, then FHIR JSON primitive types and every
    required binding): every problem fhir.resources reports, maybe more, and never a crash."""
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": resource}]}
    kind, got = outcome(bundle_errors, bundle)
    expected_kind, expected = outcome(_reference_bundle_errors, bundle)
    assert kind == "returned"
    if expected_kind == "returned" and expected:
        assert got
        if not any("unknown resource type" in e for e in expected):
            assert set(expected) <= set(got)
    if not got:
        assert (expected_kind, expected) == ("returned", [])


@SETTINGS
@given(mutated())
def test_the_rest_check_reports_what_fhir_resources_reports(resource: dict[str, Any]) -> None:
    kind, got = outcome(functools.partial(validate_resource, bindings=Bindings.REQUIRED), resource)
    expected_kind, expected = outcome(_reference_rest, resource)
    if expected_kind == "invalid":
        assert kind == "invalid" and set(expected) <= set(got)
    elif expected_kind == "returned":
        assert kind in ("returned", "invalid")
    else:
        assert (kind, got) == (expected_kind, expected)


# -- primitives ------------------------------------------------------------------------------------


@functools.cache
def _adapter(kind: str) -> pydantic.TypeAdapter[Any]:
    annotation = getattr(fhir_types, kind[0].upper() + kind[1:] + "Type")
    return pydantic.TypeAdapter(annotation)


def pydantic_accepts(kind: str, value: Any) -> bool:
    try:
        _adapter(kind).validate_python(value)
    except (pydantic.ValidationError, ValueError):
        return False
    return True


ANY_JSON = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(),
    st.from_regex(
        r"[0-9]{4}(-[0-9]{2}(-[0-9]{2}(T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2}))?)?)?",
        fullmatch=True,
    ),
)
KINDS = sorted(k for k in structure.PRIMITIVE_KINDS)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(KINDS), value=ANY_JSON)
def test_a_primitive_fast_yes_is_a_pydantic_yes(kind: str, value: Any) -> None:
    if structure.primitive(kind)(value):
        assert pydantic_accepts(kind, value)


# Where the rule is exact, both verdicts agree on values drawn from FHIR's own regex.
EXACT: dict[str, st.SearchStrategy[Any]] = {
    "date": st.from_regex(fhir_types.Date.pattern, fullmatch=True),
    "dateTime": st.from_regex(fhir_types.DateTime.pattern, fullmatch=True),
    "instant": st.from_regex(fhir_types.Instant.pattern, fullmatch=True),
    "time": st.from_regex(fhir_types.Time.pattern, fullmatch=True),
    "id": st.one_of(st.from_regex(r"[A-Za-z0-9\-.]{0,300}", fullmatch=True), st.text(max_size=5)),
    "oid": st.one_of(
        st.from_regex(r"urn:oid:[0-3](\.[0-9]{1,3}){0,4}\.?", fullmatch=True), st.text(max_size=5)
    ),
    "code": st.from_regex(r"[a-zA-Zé0-9 ]{0,12}", fullmatch=True),
    "decimal": st.one_of(
        st.integers(), st.floats(), st.from_regex(r"-?[0-9]{1,4}(\.[0-9]{0,3})?(e[0-9])?", fullmatch=True)
    ),
    "integer": st.integers(-(2**32), 2**32),
    "unsignedInt": st.integers(-5, 2**32),
    "positiveInt": st.integers(-5, 2**32),
    "boolean": st.booleans(),
    "base64Binary": st.from_regex(
        r"([A-Za-z0-9+/]{4}){0,3}([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?", fullmatch=True
    ),
    "uri": st.text(max_size=20),
    "url": st.text(max_size=20),
    "string": st.text(alphabet=st.characters(blacklist_characters="\x1c\x1d\x1e\x1f"), max_size=10),
}


@settings(max_examples=300, deadline=None)
@given(data=st.data(), kind=st.sampled_from(sorted(EXACT)))
def test_exact_primitive_rules_agree_both_ways(data: st.DataObject, kind: str) -> None:
    value = data.draw(EXACT[kind])
    assert structure.primitive(kind)(value) == pydantic_accepts(kind, value)


def test_bindings_are_enforced_only_on_request() -> None:
    patient = {"resourceType": "Patient", "gender": "zzz"}
    assert conforms(patient)
    assert not conforms(patient, bindings=True)
    with pytest.raises(InvalidResource) as caught:
        validate_resource(patient, bindings=Bindings.REQUIRED)
    assert caught.value.issues == [
        ("code-invalid", "'zzz' is not one of male | female | other | unknown", "Patient.gender")
    ]
    assert conforms_fast(patient, bindings=Bindings.UNCHECKED)
    validate_resource(patient, bindings=Bindings.UNCHECKED)
    with pytest.raises(InvalidResource) as caught:  # unchecked codes, JSON types still checked
        validate_resource({**patient, "active": "true"}, bindings=Bindings.UNCHECKED)
    assert [i[2] for i in caught.value.issues] == ["Patient.active"]
    # an open list ("+") enforces nothing
    assert conforms({"resourceType": "Observation", "status": "whatever", "code": {}}, bindings=True)


def test_what_is_left_to_fhir_resources_still_gets_its_verdict() -> None:
    lax = {"resourceType": "Patient", "active": "true", "multipleBirthInteger": "3"}
    assert not conforms(lax)  # not decided here
    assert model_accepts(lax)
    with pytest.raises(InvalidResource) as caught:  # FHIR JSON types: a client reading it back is strict
        validate_resource(lax, bindings=Bindings.REQUIRED)
    assert [i[2] for i in caught.value.issues] == ["Patient.active", "Patient.multipleBirthInteger"]
    bundle = {"resourceType": "Bundle", "entry": [{"resource": lax}]}
    assert [e.split(":")[0] for e in bundle_errors(bundle)] == [
        "Bundle.entry[0].resource.active",
        "Bundle.entry[0].resource.multipleBirthInteger",
    ]


@SETTINGS
@given(mutated())
def test_the_compiled_yes_of_the_rest_check_leaves_nothing_for_the_walk(resource: dict[str, Any]) -> None:
    """validate_resource returns on the compiled check alone: it must never accept a wrong JSON type
    or a code outside a required binding that the walk would report."""
    if validation.conforms(resource, bindings=validation.required_codes):
        model = validation.model_of(resource["resourceType"])
        assert model is not None
        walked = validation._issues(model, resource, resource["resourceType"], Bindings.REQUIRED)
        assert list(walked) == []
        assert model_accepts(resource)
