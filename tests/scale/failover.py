"""What the node-failure test and bench/bench_failover.py share: which far-end connections belonged to
the killed node, what PostgreSQL had recorded done at the kill, and how the second copies of a message
at the far end are told apart (a redelivery the far end recognises by id, or a duplicate)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import asyncpg
import psutil

from tests.fakes import Receiver

Arrival = tuple[float, int]  # time.monotonic(), the sender's port


def far_end_ports(pid: int, far_port: int) -> set[int]:
    """The local ports of the connections to the far end of this process and of its children."""
    ports: set[int] = set()
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                for c in p.net_connections("tcp"):
                    if c.raddr and c.raddr.port == far_port:
                        ports.add(c.laddr.port)
    return ports


async def recorded_sent(dsn: str, schema: str) -> set[str]:
    """The control ids of the messages PostgreSQL holds as SENT (delivered and recorded)."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        rows = await conn.fetch("SELECT control_id FROM messages WHERE status='SENT'")
    finally:
        await conn.close()
    return {r["control_id"] for r in rows}


def copies(far: Receiver) -> dict[str, list[Arrival]]:
    """Each control id's arrivals at the far end, in order (MSH-10 read without a full parse)."""
    out: dict[str, list[Arrival]] = {}
    for frame, arrival in zip(list(far.received), list(far.arrived), strict=True):
        cid = frame.split(b"\r", 1)[0].split(b"|")[9].decode()
        out.setdefault(cid, []).append(arrival)
    return out


@dataclass
class SecondCopies:
    recognised: dict[str, float]  # control id -> when the survivor sent it again
    duplicates: list[str]


def second_copies(
    arrivals: dict[str, list[Arrival]], killed_ports: set[int], recorded: set[str], recorded_at: float
) -> SecondCopies:
    """The one legitimate second copy: the killed node sent the message and the far end confirmed it,
    but the node died before PostgreSQL recorded it, so the survivor sent it again; a far end that
    confirms by message id takes it as the same delivery. Any other (a copy sent after the delivery
    was recorded done at ``recorded_at``, two from one node, a third) is a duplicate."""
    out = SecondCopies({}, [])
    for cid, got in arrivals.items():
        if len(got) < 2:
            continue
        first, second = got[0], got[1]
        if (
            len(got) == 2
            and first[1] in killed_ports
            and second[1] not in killed_ports
            and not (cid in recorded and second[0] >= recorded_at)
        ):
            out.recognised[cid] = second[0]
        else:
            out.duplicates.append(cid)
    return out
