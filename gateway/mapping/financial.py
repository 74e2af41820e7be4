"""Mapping functions for the patient accounting feeds (mappings/bar.yaml, bar_purge.yaml, dft.yaml):
the charge (FT1 → ChargeItem) and its amounts, and the one-visit rule of a BAR message.

**Keys.** A ChargeItem is written under a key scoped to the account it is posted to (PID-18, the
account number in its namespace: in France the "numéro de dossier" of the establishment),
``urn:passerelle:account:<account system>:<account number>:charge``, with the sender's transaction
id (FT1-2) as value. Without a transaction id, the charge is one of this message: the sender, the
message control id (MSH-10) and the FT1 set id (else its place), so that a replay writes it again
and another message never overwrites it. Without an account number, the patient's key scopes it
instead (``urn:passerelle:patient:…``); without either, the charge is not written (its leaves stay in
the unmapped report, with a warning).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

from gateway.core.errors import ValidationError
from gateway.mapping.clinical import (
    PATIENT_SCOPE,
    _cx_identifiers,
    _preferred,
    _scoped,
    _set_id,
    patient_key,
)
from gateway.mapping.engine import Context
from gateway.mapping.functions import _number

Function = Callable[[Context, Any], Any]

ACCOUNT_SCOPE: Final = "urn:passerelle:account:"
# ISO 4217 alphabetic codes are three capital letters (Money.currency); anything else is reported.
_CURRENCY: Final = re.compile(r"[A-Z]{3}")


def account_key(ctx: Context) -> tuple[str, str] | None:
    """The key of the account mapped here (PID-18, its first namespaced repetition), or None."""
    occ = ctx.occurrence("PID") or 1
    memo = ("financial:account", occ)
    if memo not in ctx.memo:
        ctx.memo[memo] = _preferred(_cx_identifiers(ctx, "PID", occ, 18, "account"), ())
    found: tuple[str, str] | None = ctx.memo[memo]
    return found


def charge_identifier(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current FT1 → the ChargeItem's key: its transaction id (FT1-2) within its account, else
    this message's charge (sender, MSH-10, set id); within the patient when no account is sent."""
    if ctx.segment is None:
        return None
    seg, occ = ctx.segment
    kind = ctx.kind or "charge"
    account = account_key(ctx)
    scope, key = (ACCOUNT_SCOPE, account) if account is not None else (PATIENT_SCOPE, patient_key(ctx))
    if key is None:
        ctx.warnings.append(
            f"{seg}[{occ}]: no namespaced account (PID-18) or patient identifier to key the charge on; "
            "not mapped (in the unmapped report)"
        )
        return None
    system = _scoped(scope, key, kind)
    transaction = ctx.read(f"{seg}[{occ}]-2").strip()
    if transaction:
        return {"system": system, "value": ctx.take(f"{seg}[{occ}]-2").strip()}
    application, facility, facility_id = ctx.sender()
    set_id, is_set_id = _set_id(ctx, seg, occ)
    if is_set_id:
        ctx.take(f"{seg}[{occ}]-1")
    value = "^".join((application, facility or facility_id, ctx.message.control_id, set_id))
    return {"system": system, "value": value}


def money(ctx: Context, _: Any) -> dict[str, Any] | None:
    """The current CP (inside an 'each': FT1-11) → Money: CP-1.1 the amount, CP-1.2 its currency
    (ISO 4217). An amount that is not a number is reported; so is a currency that is not a code."""
    amount, amount_leaf = ctx.value(".1.1")
    if not amount.strip():
        return None
    number = _number(amount)
    if number is None:
        ctx.degrade(f"{ctx.here('.1.1')}: not a number; amount left out")
        return None
    out: dict[str, Any] = {"value": number}
    ctx.consume(amount_leaf)
    currency, currency_leaf = ctx.value(".1.2")
    if _CURRENCY.fullmatch(currency):
        out["currency"] = currency
        ctx.consume(currency_leaf)
    elif currency:
        ctx.warnings.append(f"{ctx.here('.1.2')}: not an ISO 4217 currency code; currency left out")
    return out


def single_visit(ctx: Context, _: Any) -> None:
    """A BAR message may carry several visit groups (PV1 and what follows it); the diagnoses,
    procedures and insurances of each belong to its own visit. The shared segment rules key them on
    the message's visit: a second PV1 would put another visit's diagnoses under the first one's
    key, so such a message is refused rather than mapped wrongly."""
    count = len(ctx.message.segments_named("PV1"))
    if count > 1:
        raise ValidationError(
            f"{count} visit groups (PV1) in one message: their diagnoses, procedures and "
            "insurances would be keyed on the first visit; one visit group per message is mapped",
            location="PV1[2]",
        )


FINANCIAL_FUNCTIONS: Final[dict[str, Function]] = {
    "charge_identifier": charge_identifier,
    "money": money,
    "single_visit": single_visit,
}
