"""The hook between /fhir writes and the FHIR intake: a request a channel routes is journaled first.

Order of a routed request, as for an MLLP message and its ACK:

1. the request was validated (by the handler, before this hook);
2. the journal commits one envelope per matching channel;
3. stored in the repository when a matching channel says ``store: true`` (the default);
4. handed to the channels; channels that answer ``after_delivery`` are waited for, and for them
   the repository write happens only once they delivered;
5. the answer: the repository's (201/200), or 202 with an OperationOutcome when nothing is stored.
   A resend (same ``X-Request-Id`` or ``Bundle.identifier``) is answered 200 and not processed again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web

from gateway.core.envelope import FHIR_JSON
from gateway.engine.fhir_intake import FhirIntake, delivery_failed
from gateway.http.auth import caller_of

FHIR_INTAKE: web.AppKey[FhirIntake] = web.AppKey("fhir_intake", FhirIntake)
MESSAGE_ID_HEADER = "X-Passerelle-Message-Id"

Write = Callable[[], Awaitable[web.Response]]


def _outcome(status: int, text: str) -> web.Response:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational", "diagnostics": text}],
    }
    return web.Response(status=status, body=orjson.dumps(body), content_type=FHIR_JSON)


async def routed(request: web.Request, data: Mapping[str, Any], method: str, write: Write) -> web.Response:
    """Run ``write`` (the repository's part) around the routing that channels ask for."""
    intake = request.app.get(FHIR_INTAKE)
    if intake is None:
        return await write()
    caller = caller_of(request)
    sender = caller.subject if caller is not None else None
    routes = intake.routes_for(data, sender)
    if not routes:
        return await write()
    receipt = await intake.journal(
        data,
        await request.read(),
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
    failure = await intake.hand_over(receipt)
    if failure is not None:
        raise delivery_failed(failure)
    if answer is None:
        answer = await write() if receipt.store else _outcome(202, f"accepted for delivery as message {ids}")
    answer.headers[MESSAGE_ID_HEADER] = ids
    return answer
