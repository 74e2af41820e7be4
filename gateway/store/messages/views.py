"""What the message stores answer, shaped once for every backend: only the SQL differs.

The SQLite and PostgreSQL stores run their own queries, then hand the rows here, so that
``/api/messages``, the trace and ``/api/stats`` look the same whichever backend holds them.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson

from gateway.core.logging import get_logger

log = get_logger("passerelle.store")

CONFLICT_CODE = "205"  # HL7 table 0357: duplicate key identifier (an MSH-10 reused for other content)


def content_digest(raw: bytes) -> str:
    """What tells a resend (the same bytes) from another message under the same dedupe key."""
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def same_content(digest: str | None, raw: bytes | None, other: str) -> bool:
    """Whether a stored message (its digest, or its raw bytes when it was written before digests
    were kept) holds the bytes whose digest is ``other``."""
    if digest is not None:
        return digest == other
    if raw is not None:
        return content_digest(bytes(raw)) == other
    return True  # nothing left to compare (the payload was pruned): a duplicate, as before


def trace_stage(row: Mapping[str, Any], *, with_payloads: bool) -> dict[str, Any]:
    """One stages row (stage, status, at, content_type, payload, detail) as the trace shows it."""
    item = {
        "stage": row["stage"],
        "status": row["status"],
        "at": row["at"],
        "content_type": row["content_type"],
        "detail": orjson.loads(row["detail"]) if row["detail"] else {},
    }
    if with_payloads:
        item["payload"] = row["payload"]
    return item


def message_filters(
    *,
    status: str | None,
    control_id: str | None,
    channel: str | None,
    before_seq: int | None,
    since: float | None,
    until: float | None,
) -> list[tuple[str, str, Any]]:
    """The list filters as (column, operator, value); each backend writes its own placeholders."""
    found: list[tuple[str, str, Any]] = [
        (column, "=", value)
        for column, value in (("status", status), ("control_id", control_id), ("channel", channel))
        if value
    ]
    if before_seq is not None:
        found.append(("seq", "<", before_seq))
    if since is not None:
        found.append(("received_at", ">=", since))
    if until is not None:
        found.append(("received_at", "<=", until))
    return found


def message_counts(
    rows: Iterable[tuple[str, str, str, int]],
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, dict[str, int]]]]:
    """(channel, message type, status, count) rows → counts per channel and status, and per
    channel, message type and status."""
    by_channel: dict[str, dict[str, int]] = {}
    by_type: dict[str, dict[str, dict[str, int]]] = {}
    for channel, message_type, status, n in rows:
        counts = by_channel.setdefault(channel, {})
        counts[status] = counts.get(status, 0) + n
        by_type.setdefault(channel, {}).setdefault(message_type, {})[status] = n
    return by_channel, by_type


def settle(fut: asyncio.Future[Any] | None, callback: Callable[[Any], None] | None, result: Any) -> None:
    """Hand a journal write's result on: to its callback (called now), else to its future."""
    if callback is not None:
        try:
            callback(result)
        except Exception as exc:  # one bad continuation must not stop the rest
            log.exception("journal_callback_failed", error=type(exc).__name__)
    elif fut is not None and not fut.done():
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)
