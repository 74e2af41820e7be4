"""Ops fixtures: a gateway configured with one token per role, and a client per role."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway import config as config_mod
from gateway.app import Gateway
from tests.conftest import ADMIN_ENTRY, make_config

OPERATOR = "operator-token-5d1e8c2a9f3b7a64"
PROFESSIONAL = "professional-token-0c4b7e2f91d3a5"
PATIENT = "patient-token-8e2a6c4f0b9d1e37a"
HS_SECRET = "a-shared-hs256-secret-for-tests-only-0123456789"  # noqa: S105

TOKENS = [
    ADMIN_ENTRY,
    {"token": OPERATOR, "subject": "op-1", "role": "operator"},
    {"token": PROFESSIONAL, "subject": "pro-1", "role": "professional", "practitioner": "8|810000000001"},
    {"token": PATIENT, "subject": "pat-1", "role": "patient", "patients": ["urn:oid:1.2.250.1.213.1.4.8|x"]},
]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def ops_config(tmp_path: Path, *, auth: dict[str, Any] | None = None, **extra: Any) -> config_mod.Config:
    """make_config's gateway, with ``auth`` (default: a token per role) and top-level overrides."""
    data = make_config(tmp_path).data
    data["auth"] = {"tokens": TOKENS} if auth is None else auth
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_mod.parse(yaml.safe_dump(data, allow_unicode=True), str(tmp_path / "config.yaml"))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def base_url(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.http_port_bound}"


Request = Callable[..., Any]
