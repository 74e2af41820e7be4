"""Every produced Bundle is validated with fhir.resources (R4B models) before it leaves.

Validation is deterministic on a resource's content, so resources already found valid
are remembered (bounded LRU, keyed by their exact JSON): a feed that repeats the same
Patient does not pay for its validation again. Nothing invalid is ever remembered.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import orjson
import pydantic
from fhir.resources.R4B import get_fhir_model_class


def bundle_errors(bundle: Mapping[str, Any]) -> list[str]:
    """Each problem as 'Bundle.entry[i].resource.<path>: message'; empty when valid."""
    errors: list[str] = []
    for i, entry in enumerate(bundle.get("entry", [])):
        resource = entry.get("resource", {})
        kind = resource.get("resourceType", "")
        try:
            model = get_fhir_model_class(kind)
        except (KeyError, ValueError, ImportError):
            errors.append(f"Bundle.entry[{i}].resource: unknown resource type {kind!r}")
            continue
        key = orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)
        if key in _VALID:
            _VALID.move_to_end(key)
            continue
        try:
            model.model_validate(resource)
        except pydantic.ValidationError as exc:
            for err in exc.errors():
                where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
                errors.append(f"Bundle.entry[{i}].resource{where}: {err['msg']}")
            continue
        _VALID[key] = None
        if len(_VALID) > _VALID_MAX:
            _VALID.popitem(last=False)
    return errors


_VALID: OrderedDict[bytes, None] = OrderedDict()
_VALID_MAX = 4096
