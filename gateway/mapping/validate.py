"""Every produced Bundle is validated against the fhir.resources R4B models before it leaves.

Each resource first goes through the compiled structure check (gateway.mapping.structure),
which only ever says yes where fhir.resources does. Anything it does not accept is validated
by fhir.resources itself, which gives the verdict and the detailed messages: errors read
exactly as they always have, and a valid resource costs tens of microseconds, not a pydantic
model build.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic
from fhir.resources.R4B import get_fhir_model_class

from gateway.mapping.structure import conforms


def bundle_errors(bundle: Mapping[str, Any]) -> list[str]:
    """Each problem as 'Bundle.entry[i].resource.<path>: message'; empty when valid."""
    errors: list[str] = []
    for i, entry in enumerate(bundle.get("entry", [])):
        resource = entry.get("resource", {})
        if conforms(resource):
            continue
        kind = resource.get("resourceType", "")
        try:
            model = get_fhir_model_class(kind)
        except (KeyError, ValueError, ImportError):
            errors.append(f"Bundle.entry[{i}].resource: unknown resource type {kind!r}")
            continue
        try:
            model.model_validate(resource)
        except pydantic.ValidationError as exc:
            for err in exc.errors():
                where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
                errors.append(f"Bundle.entry[{i}].resource{where}: {err['msg']}")
        except (AttributeError, KeyError, TypeError):
            # fhir.resources crashes on some malformed shapes (a primitive extension that is not an
            # object): still a verdict of "invalid", never an unhandled error.
            errors.append(f"Bundle.entry[{i}].resource: malformed element structure")
    return errors
