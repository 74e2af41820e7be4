"""What the mapping tests share: a real SQLite FHIR repository to write mapped Bundles into."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.store.fhir import SqliteFhirRepository


@pytest.fixture
async def repo(tmp_path: Path) -> AsyncIterator[SqliteFhirRepository]:
    r = SqliteFhirRepository(tmp_path / "fhir.db")
    await r.open()
    yield r
    await r.close()
