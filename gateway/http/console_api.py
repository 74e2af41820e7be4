"""The console's own views under /api/console: overview, plots, problems, intake rejections and the
message view. Operator role, like the rest of /api; every value shown is masked unless revealed.

Everything here is read from what the gateway already keeps: the runtime snapshot, the metrics
source (sampled by ``metrics.History`` for the plots) and the message store.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web

from gateway.config import ConsoleSettings
from gateway.core.charts import line_chart
from gateway.core.envelope import FHIR_JSON, HL7_V2
from gateway.core.errors import BadRequest, NotFound
from gateway.engine.retry import RetryPolicy
from gateway.http.audit import record_reveal
from gateway.http.auth import Role, require
from gateway.http.masking import mask_hl7, payload_text
from gateway.http.message_view import fhir_tree, hl7_fields, stored_links
from gateway.http.metrics import CHART_KINDS, METRICS, History
from gateway.http.outcome import json_response

DEFAULT_LOCALE = ConsoleSettings().locale
_BACKLOG = ("RECEIVED", "TRANSFORMED", "QUEUED")
_TITLES = {
    "throughput": ("Messages per second", "msg/s"),
    "latency": ("ACK latency (percentiles)", "ms"),
    "depth": ("Queue depth", "messages"),
    "errors": ("Errors", "messages"),
}
_SENDER_WINDOW = 1000  # messages read per refresh to follow the senders


def console_settings(config: Mapping[str, Any], *, locale: str = DEFAULT_LOCALE) -> dict[str, Any]:
    """What the console needs: its locale and, from config.yaml's data, each channel's source and
    destinations (with their retry policy, for the next attempt)."""
    channels = []
    for ch in config.get("channels", ()):
        channels.append(
            {
                "name": ch["name"],
                "source": ch["source"],
                "queue": bool(ch.get("queue", True)),
                "destinations": [
                    {"name": d["name"], "type": d.get("type", ""), "retry": dict(d.get("retry") or {})}
                    for d in ch.get("destinations", ())
                ],
            }
        )
    return {
        "locale": locale,
        "channels": channels,
        "sources": [{"name": s["name"], "type": s.get("type", "")} for s in config.get("sources", ())],
    }


def listener_states(sources: Mapping[str, Any]) -> dict[str, Any]:
    """Each source's listening state and open connections, read from the source objects."""
    now, mono = time.time(), time.monotonic()
    out: dict[str, Any] = {}
    for name, src in sources.items():
        # The asyncio server a network source keeps while it listens (None once stopped).
        server = getattr(src, "_server", None)
        listening = server is not None and server.is_serving()
        port = None
        if server is not None and listening and server.sockets:
            port = int(server.sockets[0].getsockname()[1])
        conns = []
        for conn in list(getattr(src, "connections", ())):
            if getattr(conn, "closed", False):
                continue
            conns.append(
                {
                    "peer": str(getattr(conn, "peer", None) and conn.peer.address),
                    "since": now - (mono - float(conn.connected_at)),
                    "last_activity": now - (mono - float(conn.last_activity)),
                    "frames": int(getattr(conn, "frames", 0)),
                }
            )
        out[name] = {
            "listening": listening,
            "host": getattr(src, "host", None),
            "port": port if port is not None else getattr(src, "port", None),
            "tls": getattr(src, "ssl", None) is not None,
            "connections": conns,
            "max_connections": getattr(src, "max_connections", None),
            "refused_connections": int(getattr(src, "refused_connections", 0)),
        }
    return out


class _Senders:
    """Last message time per sender (MSH-3^MSH-4), followed from the store's newest messages."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, Any]] = {}
        self.until = 0.0

    async def refresh(self, store: Any) -> list[dict[str, Any]]:
        since = self.until - 1 if self.until else None
        rows = await store.list_messages(
            status=None, control_id=None, channel=None, limit=_SENDER_WINDOW, before_seq=None, since=since
        )
        for row in reversed(rows):
            sender = row.get("sender") or "(unknown)"
            at = float(row.get("received_at") or 0)
            known = self.seen.get(sender)
            if known is None or at >= known["last_at"]:
                self.seen[sender] = {
                    "sender": sender,
                    "last_at": at,
                    "channel": row.get("channel"),
                    "last_status": row.get("status"),
                    "rejected": str(row.get("channel") or "").startswith("source:"),
                }
            self.until = max(self.until, at)
        return sorted(self.seen.values(), key=lambda s: -float(s["last_at"]))


SETTINGS: web.AppKey[dict[str, Any]] = web.AppKey("console_settings", dict)
_RUNTIME: web.AppKey[Any] = web.AppKey("console_runtime", object)
_HISTORY: web.AppKey[History] = web.AppKey("console_history", History)
_SENDERS: web.AppKey[_Senders] = web.AppKey("console_senders", _Senders)


def add_console_api_routes(app: web.Application, runtime: Any, settings: Mapping[str, Any] | None) -> None:
    """After add_metrics_route: the plots sample its source."""
    app[SETTINGS] = dict(settings or console_settings({}))
    app[_RUNTIME] = runtime
    app[_SENDERS] = _Senders()
    source = app.get(METRICS)
    if source is not None:
        app[_HISTORY] = History(source)
    app.router.add_get("/api/console/settings", get_settings)
    app.router.add_get("/api/console/overview", overview)
    app.router.add_get("/api/console/charts/{kind}.svg", chart)
    app.router.add_get("/api/console/problems", problems)
    app.router.add_get("/api/console/rejections", rejections)
    app.router.add_get("/api/console/messages/{id}", message_view)
    app.router.add_get("/api/console/fhir/{type}/{id}", stored_resource)


def _runtime(request: web.Request) -> Any:
    return request.app[_RUNTIME]


async def get_settings(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return json_response({"locale": settings["locale"]})


def _next_attempt(policy: RetryPolicy, queued: bool, delivery: Mapping[str, Any]) -> float | None:
    """When a failed delivery is tried again: its last attempt plus the policy's backoff (the ±10 %
    jitter aside); None when it will not be (out of attempts, or a channel without queue)."""
    attempts = int(delivery.get("attempts") or 0)
    if delivery.get("status") != "ERROR" or not queued or attempts >= policy.max_attempts:
        return None
    return float(delivery.get("updated_at") or 0) + policy.backoff(attempts)


async def _retrying(store: Any, channel: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The failed deliveries of a channel's messages waiting for another attempt, per destination."""
    rows = await store.list_messages(
        status="ERROR", control_id=None, channel=channel["name"], limit=20, before_seq=None
    )
    policies = {d["name"]: RetryPolicy.from_config(d["retry"]) for d in channel["destinations"]}
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        msg = await store.get_message(row["id"], with_payloads=False)
        for delivery in (msg or {}).get("deliveries", ()):
            if delivery.get("status") != "ERROR":
                continue
            policy = policies.get(delivery["destination"], RetryPolicy())
            out.setdefault(delivery["destination"], []).append(
                {
                    "message_id": row["id"],
                    "control_id": row.get("control_id"),
                    "attempts": delivery.get("attempts"),
                    "max_attempts": policy.max_attempts,
                    "last_attempt_at": delivery.get("updated_at"),
                    "last_error": delivery.get("last_error"),
                    "next_attempt_at": _next_attempt(policy, channel["queue"], delivery),
                }
            )
    return out


async def overview(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    settings = request.app[SETTINGS]
    stats = await runtime.store.stats()
    snap = runtime.snapshot()
    live = {c["name"]: c for c in snap.get("channels", ())}
    counts = stats.get("channels", {})
    dest_counts = stats.get("destinations", {})
    channels = []
    for ch in settings["channels"]:
        name = ch["name"]
        state = live.get(name)
        status = "stopped" if state is None else "recovering" if state.get("recovering") else "running"
        mine = counts.get(name, {})
        retrying = await _retrying(runtime.store, ch) if mine.get("ERROR") else {}
        destinations = [
            {
                "name": d["name"],
                "type": d["type"],
                "counts": dest_counts.get(d["name"], {}),
                "max_attempts": RetryPolicy.from_config(d["retry"]).max_attempts,
                "retrying": retrying.get(d["name"], []),
            }
            for d in ch["destinations"]
        ]
        channels.append(
            {
                "name": name,
                "source": ch["source"],
                "state": status,
                "received": int(((state or {}).get("counters") or {}).get("received", 0)),
                "counts": mine,
                "depth": sum(mine.get(s, 0) for s in _BACKLOG),
                "destinations": destinations,
            }
        )
    listeners = snap.get("listeners", {})
    intake = snap.get("sources", {})
    sources = [
        {
            "name": s["name"],
            "type": s["type"],
            "acked": (intake.get(s["name"]) or {}).get("acked", 0),
            "rejected": (intake.get(s["name"]) or {}).get("rejected", 0),
            "stored_rejections": sum(counts.get(f"source:{s['name']}", {}).values()),
            **(listeners.get(s["name"]) or {"listening": None, "connections": []}),
        }
        for s in settings["sources"]
    ]
    senders = await request.app[_SENDERS].refresh(runtime.store)
    return json_response(
        {
            "at": time.time(),
            "started_at": snap.get("started_at"),
            "channels": channels,
            "sources": sources,
            "senders": senders,
            "journal": stats.get("journal", {}),
        }
    )


async def chart(request: web.Request) -> web.Response:
    kind = request.match_info["kind"]
    if kind not in CHART_KINDS:
        raise NotFound(f"no chart {kind!r}; one of {', '.join(CHART_KINDS)}")
    history = request.app.get(_HISTORY)
    if history is None:
        raise NotFound("no metrics source: plots are not available")
    await history.sample()
    channel = request.query.get("channel") or None
    own: Sequence[str] = ()
    if channel is not None:
        found = [c for c in request.app[SETTINGS]["channels"] if c["name"] == channel]
        if not found:
            raise BadRequest(f"no channel {channel!r}", location="channel")
        own = [d["name"] for d in found[0]["destinations"]]
    labels, series = history.series(kind, channel, own)
    title, unit = _TITLES[kind]
    svg = line_chart(title + (f" — {channel}" if channel else ""), labels, series, y_title=unit)
    last = [v[-1] for v in series.values() if v and v[-1] is not None]
    peak = max((x for v in series.values() for x in v if x is not None), default=0.0)
    headers = {
        "Cache-Control": "no-store",
        "X-Chart-Samples": str(len(labels)),
        "X-Chart-Peak": f"{peak:g}",
        "X-Chart-Last": ",".join(f"{x:g}" for x in last),
    }
    return web.Response(text=svg, content_type="image/svg+xml", headers=headers)


async def _with_reasons(store: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the failure's own words: the stored error column is a short code."""
    for row in rows:
        msg = await store.get_message(row["id"], with_payloads=False)
        reason = location = None
        for stage in reversed((msg or {}).get("stages", ())):
            detail = stage.get("detail") or {}
            if stage.get("status") in ("ERROR", "DEAD") and (detail.get("text") or detail.get("detail")):
                reason = detail.get("text") or detail.get("detail")
                location = detail.get("location")
                break
        row["reason"] = reason or row.get("error")
        row["location"] = location
        row["code"] = row.get("error")
    return rows


def _limit(request: web.Request, default: int) -> int:
    raw = request.query.get("limit") or str(default)
    if not raw.isdigit() or not 1 <= int(raw) <= 500:
        raise BadRequest("limit must be an integer between 1 and 500", location="limit")
    return int(raw)


async def problems(request: web.Request) -> web.Response:
    store = _runtime(request).store
    limit = _limit(request, 100)
    dead = await store.dead_letters(None, limit)
    errors = await store.list_messages(
        status="ERROR", control_id=None, channel=None, limit=limit, before_seq=None
    )
    errors = [r for r in errors if not str(r.get("channel") or "").startswith("source:")]
    return json_response(
        {"dead": await _with_reasons(store, dead), "errors": await _with_reasons(store, errors)}
    )


async def rejections(request: web.Request) -> web.Response:
    """Frames refused at intake (kept under the channel ``source:NAME``), newest first."""
    store = _runtime(request).store
    limit = _limit(request, 100)
    control_id = request.query.get("control_id") or None
    rows: list[dict[str, Any]] = []
    for source in request.app[SETTINGS]["sources"]:
        rows += await store.list_messages(
            status=None,
            control_id=control_id,
            channel=f"source:{source['name']}",
            limit=limit,
            before_seq=None,
        )
    rows.sort(key=lambda r: -float(r.get("received_at") or 0))
    return json_response({"rejections": await _with_reasons(store, rows[:limit])})


def _fhir_payloads(stages: list[dict[str, Any]]) -> tuple[bytes | None, list[Any]]:
    """The FHIR the steps produced (the last step's output) and the transaction-responses."""
    produced: bytes | None = None
    responses: list[Any] = []
    for stage in stages:
        if stage.get("content_type") != FHIR_JSON or stage.get("payload") is None:
            continue
        if str(stage["stage"]).startswith("step:"):
            produced = stage["payload"]
        elif str(stage["stage"]).startswith("delivery:"):
            try:
                responses.append(orjson.loads(stage["payload"]))
            except orjson.JSONDecodeError:
                continue
    return produced, responses


async def message_view(request: web.Request) -> web.Response:
    mid = request.match_info["id"]
    reveal = request.query.get("reveal", "").lower() in ("1", "true", "yes")
    if reveal:
        require(request, Role.OPERATOR)
    runtime = _runtime(request)
    msg = await runtime.store.get_message(mid, with_payloads=True)
    if reveal:
        await record_reveal(request, mid, 200 if msg is not None else 404)
    if msg is None:
        raise NotFound(f"no message {mid}")
    charset = msg.get("charset") or "ASCII"
    raw: bytes | None = msg.pop("raw", None)
    segments = fhir = None
    if raw is not None and msg.get("content_type") in (None, HL7_V2):
        segments = hl7_fields(raw, charset, reveal=reveal)
    produced, responses = _fhir_payloads(msg["stages"])
    if produced is None and raw is not None and msg.get("content_type") == FHIR_JSON:
        produced = raw  # a FHIR intake: the message is the FHIR
    tree = fhir_tree(produced, reveal=reveal)
    if tree is not None:
        fhir = {"resource": tree, "links": stored_links(tree, responses)}
    warnings: list[str] = []
    unmapped: list[str] = []
    for stage in msg["stages"]:
        detail = stage.get("detail") or {}
        if stage["stage"] == "transformed":
            warnings, unmapped = list(detail.get("warnings", ())), list(detail.get("unmapped", ()))
        payload = stage.pop("payload", None)
        if payload is not None and stage.get("content_type") == HL7_V2:
            stage["payload"] = payload_text(payload, charset) if reveal else mask_hl7(payload, charset)
    channel = str(msg.get("channel") or "")
    return json_response(
        {
            **{k: v for k, v in msg.items() if k != "stages"},
            "stages": msg["stages"],
            "segments": segments,
            "unreadable": segments is None and raw is not None and fhir is None,
            "fhir": fhir,
            "warnings": warnings,
            "unmapped": unmapped,
            "rejected_at_intake": channel.startswith("source:"),
            "masked": not reveal,
        }
    )


async def stored_resource(request: web.Request) -> web.Response:
    """A resource of the FHIR repository, masked like the message view (the REST API at /fhir
    serves it whole to whoever may read it)."""
    type_, id_ = request.match_info["type"], request.match_info["id"]
    if not type_.isalpha() or not type_[:1].isupper():
        raise BadRequest(f"not a resource type: {type_!r}", location="type")
    found = await _runtime(request).fhir.read(type_, id_)
    if found is None:
        raise NotFound(f"no {type_}/{id_} in the repository")
    return json_response(
        {
            "path": f"/fhir/{type_}/{id_}",
            "resource": fhir_tree(orjson.dumps(found), reveal=False),
            "masked": True,
        }
    )
