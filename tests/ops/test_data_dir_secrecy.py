"""On-disk secrecy: the data directory and its databases are private; the partition key is whole."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest

from gateway.app import PARTITION_KEY_BYTES, _installation_secret
from gateway.core.errors import ConfigError
from tests.conftest import GatewayFactory
from tests.messages import adt
from tests.ops.conftest import ops_config


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_data_dir_and_databases_are_private(
    tmp_path: Path, start_gateway: GatewayFactory, client_for: Any
) -> None:
    gw = await start_gateway(ops_config(tmp_path))
    await client_for(gw).send(adt("PRIV1"))
    await gw.store.flush()
    assert _mode(gw.data_dir) == 0o700
    dbs = [gw.data_dir / n for n in ("passerelle.db", "fhir.db", "audit.db", "partition.key")]
    wal = [p for p in gw.data_dir.iterdir() if p.name.endswith(("-wal", "-shm"))]
    assert wal  # the journal runs in WAL mode: its side files must be private too
    for path in [*dbs, *wal]:
        assert _mode(path) == 0o600, path.name


def test_a_partition_key_of_the_wrong_length_is_remade_while_the_journal_is_empty(tmp_path: Path) -> None:
    key_path = tmp_path / "partition.key"
    key_path.write_bytes(b"")  # a crash between creation and write
    key = _installation_secret(key_path)
    assert len(key) == PARTITION_KEY_BYTES and key_path.read_bytes() == key
    assert _mode(key_path) == 0o600
    assert _installation_secret(key_path) == key  # kept from then on
    # an empty journal (tables made, no message) does not block remaking either
    with sqlite3.connect(tmp_path / "passerelle.db") as conn:
        conn.execute("CREATE TABLE messages (id TEXT)")
    key_path.write_bytes(key[:5])
    assert len(_installation_secret(key_path)) == PARTITION_KEY_BYTES


def test_a_short_partition_key_with_messages_journaled_refuses_to_start(tmp_path: Path) -> None:
    key_path = tmp_path / "partition.key"
    key_path.write_bytes(b"\x01" * 7)
    with sqlite3.connect(tmp_path / "passerelle.db") as conn:
        conn.execute("CREATE TABLE messages (id TEXT)")
        conn.execute("INSERT INTO messages VALUES ('01A')")
    with pytest.raises(ConfigError, match="restore the key") as caught:
        _installation_secret(key_path)
    assert caught.value.key == "data_dir"
    assert key_path.read_bytes() == b"\x01" * 7  # left as found for the operator
