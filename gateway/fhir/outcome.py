"""FHIR OperationOutcome: the one place it is built (HTTP answers, validation, transactions,
conformance findings). What an issue says comes from the caller; its shape from here."""

from __future__ import annotations

from typing import Any

from gateway.core.errors import PasserelleError


def issue(code: str, text: str, *, severity: str = "error", location: str | None = None) -> dict[str, Any]:
    """One issue: ``code`` from FHIR's issue-type value set, ``location`` as a FHIRPath expression."""
    out: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": text}
    if location:
        out["expression"] = [location]
    return out


def outcome(*issues: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": list(issues)}


def information(text: str) -> dict[str, Any]:
    """An outcome that only informs (a deletion done, an export started)."""
    return outcome(issue("informational", text, severity="information"))


def of_error(exc: PasserelleError) -> dict[str, Any]:
    """A gateway error as an outcome: its FHIR issue code, its message and where it is."""
    return outcome(issue(exc.fhir_issue_code, exc.message, location=exc.location))
