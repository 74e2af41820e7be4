"""The console's /api/console routes and the masking of its message view, without a browser."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from gateway import config as config_mod
from gateway.core.errors import ConfigError
from gateway.http.message_view import fhir_tree, hl7_fields, stored_links
from tests.conftest import GatewayFactory, make_config, with_settings
from tests.messages import adt
from tests.ops.conftest import OPERATOR, PROFESSIONAL, TOKENS, base_url, bearer
from tests.waiting import until

LAB = (
    "MSH|^~\\&|LABO|LABO-NORD|PASSERELLE|GHT|20261123101500||ORU^R01^ORU_R01|L1|P|2.5|||||FRA|UNICODE UTF-8\r"
    "PID|1||200002^^^HOPITAL-NORD&1.2.250.1.71.4.2.2.1234&ISO^PI||MARCHAND^Hélène^^^^^L||19620130|F|||"
    "3 place du Marché^^Dole^^39100^FRA^H||0384000000^PRN^PH\r"
    "NK1|1|MARCHAND^Jean|SPO^Spouse^HL70063||0384111111\r"
    "GT1|1||MARCHAND^Jean\r"
    + "|".join(
        ["IN1", "1", "PLAN1", "CPAM"]
        + [""] * 12
        + ["MARCHAND^Hélène", "SEL", "19620130", "3 place du Marché^^Dole"]
        + [""] * 29
        + ["2620139100000"]
    )
    + "\r"
    + "OBR|1|C1^LABO-NORD|R1^LABO-NORD|2345-7^Glucose^LN\r"
    "OBX|1|NM|2345-7^Glucose^LN||5.4|mmol/L|3.9-6.1|N|||F\r"
    "OBX|2|TX|8251-1^Service comment^LN||Mme MARCHAND à rappeler\r"
    "NTE|1||appeler Mme MARCHAND\r"
)


def _fields(segments: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for seg in segments:
        for f in seg["fields"]:
            out.setdefault(f"{seg['name']}-{f['n']}", f)
    return out


def test_fields_are_masked_leaf_by_leaf_and_codes_stay_readable() -> None:
    fields = _fields(hl7_fields(LAB.encode(), "ASCII", reveal=False) or [])
    # codes, units, references ranges and the header stay
    assert fields["OBX-3"] == {"n": 3, "value": "2345-7^Glucose^LN", "masked": False}
    assert fields["OBX-6"]["value"] == "mmol/L" and fields["OBX-5"]["value"] == "5.4"
    assert fields["NK1-3"]["value"] == "SPO^Spouse^HL70063"
    assert fields["MSH-3"]["value"] == "LABO" and fields["PID-8"]["value"] == "F"
    # each identifying leaf goes, the structure and the codes beside it stay
    assert fields["PID-3"]["value"] == "***^^^HOPITAL-NORD&1.2.250.1.71.4.2.2.1234&ISO^PI"
    assert fields["PID-5"]["value"] == "***^***^^^^^L"
    assert fields["PID-11"]["value"] == "***^^***^^***^FRA^H"
    assert fields["PID-13"]["value"] == "***^PRN^PH"
    assert fields["PID-7"]["value"] == "***" and fields["PID-7"]["masked"] is True
    assert fields["NK1-2"]["value"] == "***^***" and fields["NK1-5"]["value"] == "***"
    assert fields["GT1-3"]["value"] == "***^***"
    assert fields["IN1-16"]["value"] == "***^***" and fields["IN1-17"]["value"] == "SEL"
    assert fields["IN1-18"]["value"] == "***" and fields["IN1-49"]["value"] == "***"
    assert fields["IN1-3"]["value"] == "CPAM"  # the insurer is no person
    # free text may name the patient: a TX result and a note are masked, a numeric one is not
    assert fields["OBX-5"]["masked"] is False
    text = [s for s in hl7_fields(LAB.encode(), "ASCII", reveal=False) or [] if s["name"] == "OBX"][1]
    assert {f["n"]: f["value"] for f in text["fields"]}[5] == "***"
    assert fields["NTE-3"]["value"] == "***"
    shown = orjson.dumps(hl7_fields(LAB.encode(), "ASCII", reveal=False)).decode()
    for secret in ("MARCHAND", "200002", "19620130", "Dole", "0384", "2620139100000"):
        assert secret not in shown
    # revealed: everything as received
    revealed = _fields(hl7_fields(LAB.encode(), "ASCII", reveal=True) or [])
    assert revealed["PID-5"] == {"n": 5, "value": "MARCHAND^Hélène^^^^^L", "masked": False}


def test_unreadable_bytes_have_no_field_view() -> None:
    assert hl7_fields(b"not hl7 at all", "ASCII", reveal=False) is None


def test_fhir_is_masked_element_by_element_with_links_to_the_stored_resources() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": "urn:oid:1.2.3", "value": "200002"}],
                    "name": [{"use": "official", "family": "MARCHAND", "given": ["Hélène"]}],
                    "birthDate": "1962-01-30",
                    "gender": "female",
                    "address": [{"city": "Dole", "country": "FRA"}],
                },
                "request": {
                    "method": "PUT",
                    "url": "Patient?identifier=urn:oid:1.2.3|200002",
                    "ifNoneExist": "identifier=urn:oid:1.2.3|200002",
                },
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}], "text": "Glucose"},
                    "valueQuantity": {"value": 5.4, "unit": "mmol/L"},
                    "note": [{"text": "appeler Mme MARCHAND"}],
                },
                "request": {"method": "POST", "url": "Observation"},
            },
        ],
    }
    masked = fhir_tree(orjson.dumps(bundle), reveal=False)
    patient = masked["entry"][0]["resource"]
    assert patient["name"] == [{"use": "official", "family": "***", "given": ["***"]}]
    assert patient["identifier"] == [{"system": "urn:oid:1.2.3", "value": "***"}]
    assert patient["birthDate"] == "***" and patient["gender"] == "female"
    assert patient["address"] == [{"city": "***", "country": "FRA"}]
    assert masked["entry"][0]["request"]["url"] == "Patient?identifier=urn:oid:1.2.3|***"
    assert masked["entry"][0]["request"]["ifNoneExist"] == "identifier=urn:oid:1.2.3|***"
    observation = masked["entry"][1]["resource"]
    assert observation["code"] == bundle["entry"][1]["resource"]["code"]  # type: ignore[index]
    assert observation["valueQuantity"] == {"value": 5.4, "unit": "mmol/L"}
    assert observation["note"] == [{"text": "***"}]
    assert "MARCHAND" not in orjson.dumps(masked).decode()
    assert fhir_tree(orjson.dumps(bundle), reveal=True) == bundle
    response = {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [
            {"response": {"status": "200 OK", "location": "Patient/p1/_history/3"}},
            {"response": {"status": "201 Created", "location": "Observation/o9/_history/1"}},
        ],
    }
    assert stored_links(masked, [response]) == ["/fhir/Patient/p1", "/fhir/Observation/o9"]
    assert stored_links(masked, []) == [None, None]


def test_the_console_locale_is_validated_like_every_key(tmp_path: Path) -> None:
    data = make_config(tmp_path).data
    data["console"] = {"locale": "French please"}
    with pytest.raises(ConfigError) as caught:
        config_mod.parse(yaml.safe_dump(data), str(tmp_path / "config.yaml"))
    assert "console.locale" in str(caught.value) and "config.yaml" in str(caught.value)
    data["console"] = {"locale": "en-GB", "theme": "dark"}
    with pytest.raises(ConfigError, match=r"console\.theme"):
        config_mod.parse(yaml.safe_dump(data), str(tmp_path / "config.yaml"))


REFUSED = b"MSH|^~\\&|DXCARE|HOPITAL-NORD|PASSERELLE|GHT|2026||ADT^A01|BAD7|P|2.5|||||FRA|KLINGON\rPID|1\r"


async def test_console_routes_overview_rejections_problems_and_plots(
    tmp_path: Path, start_gateway: GatewayFactory, client_for: Any
) -> None:
    cfg = make_config(tmp_path)
    cfg = with_settings(cfg, auth={"tokens": TOKENS})
    cfg.data["channels"][0]["destinations"][0].update(
        plan=["error"], retry={"max_attempts": 4, "initial_backoff_s": 60}
    )
    gw = await start_gateway(cfg)
    client = client_for(gw)
    url = base_url(gw)
    async with aiohttp.ClientSession(headers=bearer(OPERATOR)) as http:
        async with http.get(f"{url}/api/console/settings") as resp:
            assert resp.status == 200 and (await resp.json()) == {"locale": "fr-FR"}
        async with http.get(f"{url}/api/console/charts/throughput.svg") as resp:
            assert resp.status == 200 and resp.headers["X-Chart-Samples"] == "0"
        await client.send(adt("OK1"))
        assert b"MSA|AR|BAD7" in await client.send(REFUSED)

        async def problems_now() -> Any:
            async with http.get(f"{url}/api/console/problems") as resp:
                found = await resp.json()
            return found if found["errors"] else None

        problems = await until(problems_now, what="a failing delivery listed")
        # the refusal at intake is not a channel error; the failing delivery is, with its words
        assert [m["control_id"] for m in problems["errors"]] == ["OK1"]
        assert problems["errors"][0]["reason"] and problems["dead"] == []

        async with http.get(f"{url}/api/console/rejections", params={"control_id": "BAD7"}) as resp:
            found = (await resp.json())["rejections"]
        assert len(found) == 1
        assert found[0]["control_id"] == "BAD7" and found[0]["code"] == "102"
        assert found[0]["location"] == "MSH-18" and "KLINGON" in found[0]["reason"]
        async with http.get(f"{url}/api/console/rejections", params={"control_id": "OK1"}) as resp:
            assert (await resp.json())["rejections"] == []

        async with http.get(f"{url}/api/console/overview") as resp:
            overview = await resp.json()
        assert [c["name"] for c in overview["channels"]] == ["adt"]  # no "source:hospital" channel
        channel = overview["channels"][0]
        assert channel["state"] == "running" and channel["source"] == "hospital"
        (far,) = channel["destinations"]
        assert far["name"] == "far" and far["max_attempts"] == 4
        (waiting,) = far["retrying"]
        assert waiting["control_id"] == "OK1" and waiting["attempts"] == 1 and waiting["max_attempts"] == 4
        assert waiting["next_attempt_at"] == pytest.approx(waiting["last_attempt_at"] + 60)
        assert waiting["last_error"] == "AE 207"
        (source,) = overview["sources"]
        assert source["name"] == "hospital" and source["listening"] is True
        assert source["rejected"] == 1 and source["stored_rejections"] == 1
        assert len(source["connections"]) == 1 and source["connections"][0]["frames"] == 2
        senders = {s["sender"]: s for s in overview["senders"]}
        assert senders["DXCARE^HOPITAL-NORD"]["last_at"] > 0

        # the message view of the refusal says so
        async with http.get(f"{url}/api/console/messages/{found[0]['id']}") as resp:
            view = await resp.json()
        assert view["rejected_at_intake"] is True and view["masked"] is True

        for kind in ("throughput", "latency", "depth", "errors"):
            async with http.get(f"{url}/api/console/charts/{kind}.svg", params={"channel": "adt"}) as resp:
                assert resp.status == 200 and resp.content_type == "image/svg+xml"
                svg = await resp.text()
            assert svg.startswith("<svg") and "<script" not in svg
            # nothing fetched from elsewhere: the only URLs are XML namespaces
            assert set(re.findall(r"https?://[^\s\"'<>]+", svg)) <= {
                "http://www.w3.org/2000/svg",
                "http://www.w3.org/1999/xlink",
            }
        async with http.get(f"{url}/api/console/charts/nothing.svg") as resp:
            assert resp.status == 404
        async with http.get(f"{url}/api/console/charts/depth.svg", params={"channel": "nope"}) as resp:
            assert resp.status == 400

    async with aiohttp.ClientSession(headers=bearer(PROFESSIONAL)) as http:
        for path in ("overview", "rejections", "problems", "settings"):
            async with http.get(f"{url}/api/console/{path}") as resp:
                assert resp.status == 403
