"""The one aiohttp application: /health, /ready, /api (and later /fhir, /metrics, /console)."""
