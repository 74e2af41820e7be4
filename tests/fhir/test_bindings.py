"""Every coded element of every R4B model is accounted for by the validation's binding tables."""

from __future__ import annotations

from typing import Any

from fhir_core.utils import is_primitive_type

from gateway.fhir.validation import (
    OPEN_CODE_LISTS,
    REQUIRED_BINDINGS,
    _elements,
    binding_of,
    closed_codes,
    listed_codes,
    model_of,
)
from gateway.http.fhir import resource_types


def _coded_elements() -> dict[tuple[str, str], Any]:
    """(model class, element) → field info, for every element carrying a short list of codes."""
    found: dict[tuple[str, str], Any] = {}
    seen: set[Any] = set()
    todo = [model_of(t) for t in resource_types()]
    while todo:
        cls = todo.pop()
        if cls is None or cls in seen:
            continue
        seen.add(cls)
        for name, info in cls.model_fields.items():
            if is_primitive_type(info) and listed_codes(info):
                found[(cls.__name__, info.alias or name)] = info
        todo += [e.model for e in _elements(cls).values() if e.model is not None]
    return found


def test_every_coded_element_is_closed_explicit_or_named_open() -> None:
    coded = _coded_elements()
    unaccounted = sorted(
        key
        for key, info in coded.items()
        if closed_codes(info) is None and key not in REQUIRED_BINDINGS and key not in OPEN_CODE_LISTS
    )
    assert unaccounted == []  # a new abbreviated list ("a | b +"): write its value set out
    assert set(REQUIRED_BINDINGS) <= set(coded)
    assert set(coded) >= OPEN_CODE_LISTS


def test_the_written_out_value_sets_extend_the_models_lists() -> None:
    coded = _coded_elements()
    for key, codes in REQUIRED_BINDINGS.items():
        listed = [c for c in listed_codes(coded[key]) or [] if c != "+"]
        assert set(listed) <= set(codes), key
        assert len(set(codes)) == len(codes), key
        assert binding_of(type(key[0], (), {}), key[1], coded[key]) == (codes, True)
