"""Conformance tools: HL7v2 and FHIR profile validators, suites run against files or live systems, reports.

Only the command line (``gateway.cli``) imports this package; the gateway itself never does.
"""
