"""ITI-68 serves a publisher's bytes: the browser must neither sniff them nor run them on our origin."""

from __future__ import annotations

from tests.documents.conftest import (  # noqa: F401 - fixtures used by name
    Client,
    auth,
    client,
    clock,
    document,
    location_id,
    patient_id,
    provide_bundle,
    publish,
    repo,
    search,
)

HTML = b"<html><script>alert(document.cookie)</script></html>"


async def test_retrieved_bytes_are_sent_as_an_inert_attachment(client: Client) -> None:  # noqa: F811
    bundle = provide_bundle(document(data=HTML, inline=True))
    bundle["entry"][1]["resource"]["content"][0]["attachment"]["contentType"] = "text/html"
    status, answer = await publish(client, bundle)
    assert status == 200, answer
    doc_id = location_id(answer["entry"][1])
    resp = await client.get(f"/fhir/DocumentReference/{doc_id}", headers=auth("pro"))
    url = (await resp.json(content_type=None))["content"][0]["attachment"]["url"]
    resp = await client.get("/fhir" + url.split("/fhir", 1)[1], headers=auth("pro"))
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Content-Security-Policy"] == "sandbox"
    assert resp.headers["Content-Disposition"] == "attachment"
    assert await resp.read() == HTML
