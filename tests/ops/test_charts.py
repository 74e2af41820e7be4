"""The SVG charts (console plots, benchmark, HTML reports) and the samples the console plots."""

from __future__ import annotations

import argparse
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from gateway.core.charts import bar_chart, line_chart, side_by_side
from gateway.core.latency import Histogram
from gateway.http.metrics import History, _quantile
from gateway.mapping.coverage import Coverage, MessageCoverage

ROOT = Path(__file__).resolve().parents[2]
SVG = "{http://www.w3.org/2000/svg}"


def _values(svg: str) -> list[str]:
    """The values pygal writes beside each point or bar (its tooltips' text)."""
    tree = ET.fromstring(svg)  # noqa: S314 - our own output
    return [d.text or "" for d in tree.iter(f"{SVG}desc") if d.get("class") == "value"]


def _inert(svg: str) -> None:
    assert svg.startswith("<svg") and "<script" not in svg and "<!--" not in svg
    assert set(re.findall(r"https?://[^\s\"'<>]+", svg)) <= {
        "http://www.w3.org/2000/svg",
        "http://www.w3.org/1999/xlink",
    }


def test_a_line_chart_is_inert_svg_with_its_values_and_gaps() -> None:
    svg = line_chart("Rates", ["10:00", "10:01", "10:02"], {"adt in/s": [1.5, None, 3.0]}, y_title="msg/s")
    _inert(svg)
    assert _values(svg) == ["1.5", "3"]  # the gap has no point
    assert "adt in/s" in svg and "Rates" in svg


def test_bars_side_by_side_keep_their_sizes() -> None:
    one = bar_chart("A", ["x"], {"s": [2]}, width=300, height=200)
    two = bar_chart("B", ["p50", "p99"], {"t": [1, None]}, width=400, height=250, horizontal=True)
    both = side_by_side([one, two])
    _inert(both)
    tree = ET.fromstring(both)  # noqa: S314 - our own output
    assert (tree.get("width"), tree.get("height")) == ("716", "250")
    inner = [e for e in tree if e.tag == f"{SVG}svg"]
    assert [e.get("x") for e in inner] == ["0", "316"]
    assert _values(both) == ["2", "1"]


def test_quantiles_interpolate_inside_their_bucket() -> None:
    bounds = (0.001, 0.01, 0.1)
    assert _quantile(bounds, [0, 0, 0, 0], 0.5) is None
    assert _quantile(bounds, [0, 10, 0, 0], 0.5) == pytest.approx(0.0055)
    assert _quantile(bounds, [5, 0, 5, 0], 0.99) == pytest.approx(0.01 + 0.09 * 0.98)


async def test_history_turns_samples_into_rates_depths_and_latency() -> None:
    hist = Histogram((0.001, 0.01, 0.1))
    state: dict[str, Any] = {"received": 0, "sent": 0}

    async def source() -> dict[str, Any]:
        return {
            "received": {("adt", "ADT^A01"): state["received"]},
            "by_type": {
                "adt": {"ADT^A01": {"SENT": state["sent"], "QUEUED": state["received"] - state["sent"]}},
                "source:hospital": {"ADT^A01": {"ERROR": 1}},
            },
            "destinations": {"far": {"SENT": state["sent"]}},
            "sources": {"hospital": {"acked": state["received"], "rejected": 1}},
            "ack_latency": {"hospital": hist},
        }

    history = History(source, interval=1.0)
    await history.sample(now=100.0)
    await history.sample(now=100.5)  # within the interval: not taken
    assert len(history.samples) == 1
    state.update(received=20, sent=10)
    for _ in range(20):
        hist.observe(0.005)
    await history.sample(now=102.0)
    labels, rates = history.series("throughput")
    assert len(labels) == 1
    assert rates == {"adt in/s": [10.0], "adt out/s": [5.0], "far → sent/s": [5.0]}
    _, depth = history.series("depth", "adt", ["far"])
    assert depth == {"adt queue": [10.0], "far → waiting": [0.0]}
    _, errors = history.series("errors")
    assert "source:hospital failed" not in errors and errors["hospital rejected at intake"] == [1.0]
    _, latency = history.series("latency")
    assert latency["hospital p50 ms"] == [pytest.approx(5.5)]
    with pytest.raises(ValueError, match="unknown chart"):
        history.series("pie")


def test_the_coverage_report_draws_its_summary() -> None:
    report = Coverage(files=1)
    report.add(MessageCoverage("ADT^A01", 8, ("ZXY-1[1]",)))
    report.add(MessageCoverage("ORU^R01", refused=("200", "UnsupportedMessage")))
    page = report.html()
    charts = re.search(r'<div class="charts">(.*?)</div>', page, re.DOTALL)
    assert charts is not None
    _inert(charts.group(1))
    assert "Content reaching FHIR" in charts.group(1) and "ADT^A01" in charts.group(1)
    assert "87.5" in _values(charts.group(1))  # 7 of 8 leaves


def test_the_conformance_report_draws_its_verdicts() -> None:
    from conformance.report import CaseResult, SuiteResult, to_html

    result = SuiteResult("demo", "Demo suite", "file")
    ok = CaseResult("c1", "first")
    ok.ok("check", "here", "fine")
    bad = CaseResult("c2", "second")
    bad.fail("check", "there", "broken")
    result.cases += [ok, bad]
    page = to_html(result).decode()
    charts = re.search(r'<div class="charts">(.*?)</div>', page, re.DOTALL)
    assert charts is not None
    _inert(charts.group(1))
    assert "Cases" in charts.group(1) and "Checks" in charts.group(1)


def test_the_mllp_benchmark_writes_its_plot(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_mllp", ROOT / "bench" / "bench_mllp.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.PLOT == ROOT / "bench" / "out" / "mllp.svg"
    args = argparse.Namespace(connections=5, rate=300.0, messages=3000, destination="file", workers=1)
    figures = {
        "acked_per_s": 1222.0,
        "e2e_per_s": 506.0,
        "p50": 1.5,
        "p95": 16.8,
        "p99": 28.1,
        "paced_p50": 5.0,
        "paced_p95": 11.4,
        "paced_p99": 17.6,
    }
    path = tmp_path / "out" / "mllp.svg"
    peers = {
        "python-hl7": {"acked_per_s": 993.0, "p50": 4.4, "p99": 13.6},
        "medplum": {"acked_per_s": 9878.0, "p50": 0.9, "p99": 3.2},
    }
    bench.write_plot(path, args, figures, peers)
    svg = path.read_text("utf-8")
    _inert(svg)
    assert {"1222", "506", "993", "9878", "28.1", "17.6", "13.6", "3.2"} <= set(_values(svg))
    assert "python-hl7 acked" in svg and "medplum acked" in svg
    assert "3000 ADT^A01" in svg
