"""OperationOutcome is built in one place: its shape, whatever answers with it."""

from __future__ import annotations

from fhir.resources.R4B.operationoutcome import OperationOutcome

from gateway.core.errors import UnknownNamespace
from gateway.fhir.outcome import information, issue, of_error, outcome


def test_an_issue_names_where_only_when_told() -> None:
    assert issue("invalid", "PID-3 vide") == {
        "severity": "error",
        "code": "invalid",
        "diagnostics": "PID-3 vide",
    }
    assert issue("invalid", "x", location="Patient.identifier[0]")["expression"] == ["Patient.identifier[0]"]


def test_every_outcome_is_valid_r4b() -> None:
    for built in (
        outcome(issue("invalid", "a"), issue("not-found", "b", severity="warning", location="Patient.id")),
        information("Patient/p1 deleted"),
        of_error(UnknownNamespace("assigning authority WEST not known", location="PID-3.4")),
    ):
        assert len(OperationOutcome.model_validate(built).issue) == len(built["issue"])


def test_a_gateway_error_keeps_its_issue_code_and_location() -> None:
    (only,) = of_error(UnknownNamespace("assigning authority WEST not known", location="PID-3.4"))["issue"]
    assert only == {
        "severity": "error",
        "code": UnknownNamespace.fhir_issue_code,
        "diagnostics": "assigning authority WEST not known",
        "expression": ["PID-3.4"],
    }
