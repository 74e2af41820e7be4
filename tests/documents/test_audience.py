"""Audience scopes add masks, never remove one: the most restrictive applicable rule wins."""

from __future__ import annotations

import itertools

import pytest

from gateway.http.auth import Caller, Role
from gateway.http.documents import actor_for
from gateway.store.documents import (
    INVISIBLE_PATIENT,
    INVISIBLE_REPRESENTANTS_LEGAUX,
    MASQUE_PS,
    MASQUE_PSOCIAL,
    MASQUE_PT,
)
from tests.documents.conftest import (
    INS,
    PATIENT_INS,
    Client,
    auth,
    document,
    location_id,
    provide_bundle,
    publish,
    search,
    visibility,
)

AUDIENCES = {"audience:social": MASQUE_PSOCIAL, "audience:third-party": MASQUE_PT}


@pytest.mark.parametrize(
    "scopes",
    [frozenset(c) for n in range(3) for c in itertools.combinations(sorted(AUDIENCES), n)]
    + [frozenset({"audience:social", "audience:third-party", "audience:legal-representative", "x"})],
)
def test_a_professional_hides_every_mask_of_every_audience_it_holds(scopes: frozenset[str]) -> None:
    caller = Caller(subject="s", role=Role.PROFESSIONAL, scopes=scopes)
    expected = MASQUE_PS
    for scope, bit in AUDIENCES.items():
        if scope in scopes:
            expected |= bit
    assert actor_for(caller).hidden == expected


def test_a_patient_scope_only_adds_the_legal_representatives_mask() -> None:
    plain = Caller(subject="p", role=Role.PATIENT, patients=("s|v",))
    assert actor_for(plain).hidden == INVISIBLE_PATIENT
    rep = Caller(
        subject="r",
        role=Role.PATIENT,
        patients=("s|v",),
        scopes=frozenset({"audience:legal-representative", "audience:social", "audience:third-party"}),
    )
    assert actor_for(rep).hidden == INVISIBLE_PATIENT | INVISIBLE_REPRESENTANTS_LEGAUX


@pytest.mark.parametrize("code", ["MASQUE_PS", "MASQUE_PSOCIAL", "MASQUE_PT"])
async def test_a_token_with_both_audiences_reads_no_masked_document(client: Client, code: str) -> None:
    status, answer = await publish(client, provide_bundle(document(labels=(visibility(code),))))
    assert status == 200, answer
    doc_id = location_id(answer["entry"][1])
    hidden_from = {
        "MASQUE_PS": {"social", "third", "social_third"},
        "MASQUE_PSOCIAL": {"social", "social_third"},
        "MASQUE_PT": {"third", "social_third"},
    }[code]
    for who in ("social_third", "social", "third"):
        hidden = who in hidden_from
        _, found = await search(client, f"patient.identifier={INS}|{PATIENT_INS}&status=current", who=who)
        assert (found["total"] == 0) == hidden, (code, who)
        resp = await client.get(f"/fhir/DocumentReference/{doc_id}", headers=auth(who))
        assert resp.status == (404 if hidden else 200), (code, who)
