"""FHIR → HL7v2: reverse mappings, FHIR intake routes, MLLP delivery."""
