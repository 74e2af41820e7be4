"""HL7v2 → FHIR mapping: declarative rules (mappings/*.yaml), concept maps, named functions."""
