"""Every mapping function a mapping file may name: the built-in ones by family, then those that
installed packages register under the ``passerelle.mapping_functions`` entry point."""

from __future__ import annotations

from importlib.metadata import entry_points

from gateway.mapping.clinical import CLINICAL_FUNCTIONS
from gateway.mapping.documents import DOCUMENT_FUNCTIONS
from gateway.mapping.engine import Function
from gateway.mapping.financial import FINANCIAL_FUNCTIONS
from gateway.mapping.functions import BUILTIN
from gateway.mapping.medication import FUNCTIONS as MEDICATION_FUNCTIONS


def available() -> dict[str, Function]:
    """Built-in functions plus those registered by installed packages."""
    found = {
        **BUILTIN,
        **DOCUMENT_FUNCTIONS,
        **CLINICAL_FUNCTIONS,
        **MEDICATION_FUNCTIONS,
        **FINANCIAL_FUNCTIONS,
    }
    for ep in entry_points(group="passerelle.mapping_functions"):
        found[ep.name] = ep.load()
    return found
