"""The hook between /fhir writes and the FHIR intake: a request a channel routes is journaled first.

Order of a routed request, as for an MLLP message and its ACK:

1. the request was validated (by the handler, before this hook);
2. the journal commits one envelope per matching channel;
3. stored in the repository when a matching channel says ``store: true`` (the default);
4. handed to the channels; channels that answer ``after_delivery`` are waited for, and for them
   the repository write happens only once they delivered;
5. the answer: the repository's (201/200), or 202 with an OperationOutcome when nothing is stored.
   A resend (same ``X-Request-Id`` or ``Bundle.identifier``) is answered 200 and not processed again.

A batch Bundle is routed without the entries that failed: those the handler refused (invalid) are
left out of what is journaled, those the repository refused are left out of what the channels get;
both are answered in the batch-response. A channel that answers after processing and whose steps
refuse the content (``unmapped: reject``, no mapping) answers 422; one that could not deliver, 502.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import orjson
from aiohttp import web

from gateway.core.envelope import FHIR_JSON
from gateway.core.errors import Unprocessable
from gateway.engine.fhir_intake import FhirIntake, delivery_failed
from gateway.fhir.outcome import information
from gateway.http.auth import caller_of

FHIR_INTAKE: web.AppKey[FhirIntake] = web.AppKey("fhir_intake", FhirIntake)
MESSAGE_ID_HEADER = "X-Passerelle-Message-Id"

Write = Callable[[], Awaitable[web.Response]]


def _outcome(status: int, text: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(information(text)), content_type=FHIR_JSON)


def _is_batch(data: Mapping[str, Any]) -> bool:
    return data.get("resourceType") == "Bundle" and data.get("type") == "batch"


def _refused_by_repository(answer: web.Response, kept: list[int]) -> list[int]:
    """Positions (among the routed entries) whose batch-response entry is not a success."""
    body = answer.body
    if not isinstance(body, bytes):
        return []
    entries = orjson.loads(body).get("entry") or []
    refused = []
    for n, i in enumerate(kept):
        status = str(((entries[i] if i < len(entries) else {}).get("response") or {}).get("status", ""))
        if status[:1] != "2":
            refused.append(n)
    return refused


async def routed(
    request: web.Request,
    data: Mapping[str, Any],
    method: str,
    write: Write,
    *,
    refused: Collection[int] = (),
) -> web.Response:
    """Run ``write`` (the repository's part) around the routing that channels ask for.

    ``refused``: for a batch, the entries the handler already answered with an error.
    """
    intake = request.app.get(FHIR_INTAKE)
    if intake is None:
        return await write()
    caller = caller_of(request)
    sender = caller.subject if caller is not None else None
    raw = await request.read()
    kept: list[int] = []
    if _is_batch(data):
        entries = list(data.get("entry") or [])
        kept = [i for i in range(len(entries)) if i not in refused]
        if refused:  # what is journaled (and routed) is the part of the batch that was accepted
            data = {**data, "entry": [entries[i] for i in kept]}
            raw = orjson.dumps(data)
        if not kept:
            return await write()
    routes = intake.routes_for(data, sender)
    if not routes:
        return await write()
    receipt = await intake.journal(
        data,
        raw,
        routes,
        method=method,
        sender=sender,
        request_id=request.headers.get("X-Request-Id") or None,
        peer=request.remote or "",
    )
    ids = ",".join(receipt.message_ids)
    if receipt.duplicate_of is not None:
        response = _outcome(200, f"already received as message {receipt.duplicate_of}: not processed again")
        response.headers[MESSAGE_ID_HEADER] = receipt.duplicate_of
        return response
    answer: web.Response | None = None
    if receipt.store and not receipt.waits:
        try:
            answer = await write()
        except Exception as exc:
            await intake.abandon(receipt, exc)
            raise
        if kept and (not_stored := _refused_by_repository(answer, kept)):
            if len(not_stored) == len(kept):
                await intake.abandon(
                    receipt, Unprocessable("the repository refused every entry of the batch")
                )
                answer.headers[MESSAGE_ID_HEADER] = ",".join(receipt.message_ids)
                return answer
            intake.narrow(receipt, data, not_stored)
    failure = await intake.hand_over(receipt)
    if failure is not None:
        raise delivery_failed(failure)
    if answer is None and receipt.store:
        try:  # delivered, but the request is not done until it is stored: a resend must be processed
            answer = await write()
        except Exception as exc:
            await intake.abandon(receipt, exc)
            raise
    if answer is None:
        answer = _outcome(202, f"accepted for delivery as message {ids}")
    answer.headers[MESSAGE_ID_HEADER] = ids
    return answer
