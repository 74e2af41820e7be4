"""Validation on the write paths and version reads (vread, history) on both backends, SQLite and
PostgreSQL (live): the tests of tests/fhir/test_write_validation.py with the ``repo`` below."""

from __future__ import annotations

from tests.fhir.conftest import client  # noqa: F401 - the fixture, with this module's ``repo``
from tests.fhir.test_write_validation import (  # noqa: F401
    test_every_page_of_what_was_written_reads_back_valid,
    test_invalid_resources_are_refused_on_every_write_path,
    test_location_headers_and_transaction_answers_resolve,
)
from tests.scale.test_pg_fhir import backend, clock, repo  # noqa: F401 - sqlite, and postgresql (live)
