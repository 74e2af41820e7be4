"""One finding of a validator, and the OperationOutcome view of a list of them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from gateway.fhir.outcome import outcome


class Severity(StrEnum):
    """FHIR issue severities; ``fatal`` is kept for input that could not be read at all."""

    FATAL = "fatal"
    ERROR = "error"
    WARNING = "warning"
    INFORMATION = "information"


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule broken (or a fact noted) at one place of a message or resource.

    ``location`` is an ER7 path for HL7v2 (``PID-3[2].4``, ``ZBE-4``, ``PV1``) and a FHIRPath
    expression for FHIR (``Patient.identifier[0].system``). ``code`` is the FHIR issue type
    (``required``, ``value``, ``structure``, ``invariant``, ``code-invalid``...). Messages name
    positions and rules, never the data itself, so findings can be logged and reported.
    """

    rule: str
    severity: Severity
    location: str
    message: str
    code: str = "invalid"

    @property
    def is_error(self) -> bool:
        return self.severity in (Severity.ERROR, Severity.FATAL)

    def as_dict(self) -> dict[str, str]:
        return {
            "rule": self.rule,
            "severity": self.severity.value,
            "code": self.code,
            "location": self.location,
            "message": self.message,
        }


def has_errors(findings: Iterable[Finding]) -> bool:
    return any(f.is_error for f in findings)


def operation_outcome(findings: Iterable[Finding]) -> dict[str, Any]:
    """The findings as a FHIR OperationOutcome (an ``information`` issue when there are none)."""
    issues: list[dict[str, Any]] = []
    for f in findings:
        issues.append(
            {
                "severity": f.severity.value,
                "code": f.code,
                "details": {"coding": [{"system": "urn:passerelle:conformance:rule", "code": f.rule}]},
                "diagnostics": f.message,
                "expression": [f.location],
            }
        )
    if not issues:
        issues.append({"severity": "information", "code": "informational", "diagnostics": "no issue found"})
    return outcome(*issues)
