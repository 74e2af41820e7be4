"""Config findings: a JWT setup must name its audience."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.core.errors import ConfigError
from tests.ops.conftest import HS_SECRET, ops_config


def test_jwt_keys_without_an_audience_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        ops_config(tmp_path, auth={"jwt": {"keys": [{"algorithm": "HS256", "secret": HS_SECRET}]}})
    err = caught.value
    assert err.file == str(tmp_path / "config.yaml")
    assert err.key is not None and err.key.startswith("auth.jwt")
    assert "audience" in err.reason
    with pytest.raises(ConfigError):
        ops_config(
            tmp_path, auth={"jwt": {"audience": "", "keys": [{"algorithm": "HS256", "secret": HS_SECRET}]}}
        )
    cfg = ops_config(
        tmp_path, auth={"jwt": {"audience": "gw", "keys": [{"algorithm": "HS256", "secret": HS_SECRET}]}}
    )
    assert cfg.settings.auth.jwt is not None and cfg.settings.auth.jwt["audience"] == "gw"
