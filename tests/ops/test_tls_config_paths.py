"""TLS files named in config resolve against the config file's directory; a key needs its cert."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest
import yaml

from connectors.mllp.client import MllpClient
from gateway import config as config_mod
from gateway.core.errors import ConfigError
from gateway.core.tls import client_context, resolve_paths
from gateway.hl7.er7 import Message
from tests.conftest import GatewayFactory, make_config, mllp_port
from tests.messages import adt
from tests.ops.test_tls import Pki


def test_a_client_key_without_its_certificate_is_a_config_error(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    with pytest.raises(ConfigError, match="cert and key go together") as caught:
        client_context({"ca": str(pki.ca_file), "key": str(pki.server_key)}, where="destinations.sih.tls")
    assert caught.value.key == "destinations.sih.tls"
    with pytest.raises(ConfigError, match="cert and key go together"):
        client_context({"cert": str(pki.server_cert)})


def test_relative_paths_resolve_against_the_given_directory(tmp_path: Path) -> None:
    out = resolve_paths(
        {"cert": "a.pem", "key": "/abs/k.pem", "ca": "sub/ca.pem", "check_hostname": False}, tmp_path
    )
    assert out == {
        "cert": str(tmp_path / "a.pem"),
        "key": "/abs/k.pem",
        "ca": str(tmp_path / "sub" / "ca.pem"),
        "check_hostname": False,
    }


async def test_relative_tls_files_are_found_beside_the_config_whatever_the_cwd(
    tmp_path: Path, start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    pki = Pki(conf_dir)
    data = make_config(tmp_path).data
    relative = {"cert": "server.pem", "key": "server.key", "ca": "ca.pem"}
    data["sources"][0]["tls"] = relative
    data["http"] = {**data["http"], "tls": relative}
    cfg = config_mod.parse(yaml.safe_dump(data, allow_unicode=True), str(conf_dir / "config.yaml"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the service manager's CWD is not the config directory
    gw = await start_gateway(cfg)
    client = MllpClient("127.0.0.1", mllp_port(gw), ssl=pki.client_ssl())
    try:
        ack = Message.decode(await client.send(adt("TLSREL1")), default_charset="UNICODE UTF-8")
    finally:
        await client.close()
    assert ack.get("MSA-1") == "AA"
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"https://127.0.0.1:{gw.http_port_bound}/health", ssl=ctx) as resp,
    ):
        assert resp.status == 200
