"""FHIR R4 itself: validation, OperationOutcome, resource structure and search parameters."""
