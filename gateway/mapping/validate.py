"""Every produced Bundle is validated before it leaves, by the one validation every resource
written through /fhir passes (gateway.fhir.validation): the R4B models, FHIR JSON primitive
types and required bindings. A valid resource costs tens of microseconds (the compiled structure
check, then a walk of the JSON); anything else gets the models' own verdict and messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.core.errors import PasserelleError
from gateway.fhir.validation import Bindings, InvalidResource, validate_resource


def bundle_errors(bundle: Mapping[str, Any]) -> list[str]:
    """Each problem as 'Bundle.entry[i].resource.<path>: message'; empty when valid."""
    errors: list[str] = []
    for i, entry in enumerate(bundle.get("entry", [])):
        where = f"Bundle.entry[{i}].resource"
        try:
            # Required bindings: mapped resources are stored and read back as /fhir writes are.
            validate_resource(entry.get("resource", {}), where, bindings=Bindings.REQUIRED)
        except InvalidResource as exc:
            errors.extend(f"{location}: {text}" for _, text, location in exc.issues)
        except PasserelleError as exc:  # no resourceType, or one the models do not know
            errors.append(f"{where}: {exc.message}")
    return errors
