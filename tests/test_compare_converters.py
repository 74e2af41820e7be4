"""bench/compare_converters.py on the shared corpus (../shared/corpus, read in place): our Bundles next to
Microsoft FHIR-Converter's, one Markdown row per message type of the samples that have an expected Bundle."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hl7_leaves import read

ROOT = Path(__file__).parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
SCRIPT = ROOT / "bench" / "compare_converters.py"

corpus = pytest.mark.skipif(
    not (CORPUS / "ms" / "expected").is_dir(),
    reason=f"the shared corpus (Microsoft samples and their expected Bundles) is not at {CORPUS}",
)


def expected_types() -> dict[str, str]:
    """Sample file name → its message type (MSH-9.1^MSH-9.2), for each sample with an expected Bundle."""
    out = {}
    for expected in sorted((CORPUS / "ms" / "expected").glob("*-expected.json")):
        sample = CORPUS / "ms" / (expected.name.removesuffix("-expected.json") + ".hl7")
        if sample.is_file():
            msg = read(sample.read_bytes())
            out[sample.name] = f"{msg.value('MSH', 9, comp=1)}^{msg.value('MSH', 9, comp=2)}"
    return out


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--corpus", str(CORPUS), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def table_rows(markdown: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        for line in markdown.splitlines()
        if line.startswith("| ")
    ]


@corpus
def test_markdown_has_a_row_per_message_type_and_a_summary() -> None:
    types = expected_types()
    assert types, "no Microsoft sample with an expected Bundle"
    started = time.monotonic()
    done = run()
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert elapsed < 60, f"took {elapsed:.0f}s"
    rows = table_rows(done.stdout)
    type_rows = {r[0]: r for r in rows if "^" in r[0]}
    assert set(type_rows) == set(types.values())
    for kind, row in type_rows.items():
        assert int(row[1]) == sum(1 for t in types.values() if t == kind)
        assert row[5].count("/") == 1  # key elements filled: ours / Microsoft
    assert f"{len(types)} Microsoft samples" in done.stdout
    element_rows = [r for r in rows if r[0].startswith("`")]
    assert "`Patient.name`" in [r[0] for r in element_rows]
    assert "`Observation.value[x]`" in [r[0] for r in element_rows]
    for row in element_rows:
        ours, microsoft, both, only_ours, only_microsoft = map(int, row[1:6])
        assert ours == both + only_ours and microsoft == both + only_microsoft
        assert max(ours, microsoft) <= len(types)


@corpus
def test_json_covers_every_expected_file() -> None:
    done = run("--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    types = expected_types()
    assert {f["file"]: f["type"] for f in data["files"]} == types
    assert data["summary"]["files"] == len(types)
    assert {t["type"] for t in data["types"]} == set(types.values())
    keys = data["key_elements"]
    for item in data["files"]:
        for side in ("ours", "microsoft"):
            assert set(item[side]["elements"]) == set(keys)
            assert all(n > 0 for n in item[side]["resources"].values())
        assert item["microsoft"]["refused"] is None
        if item["ours"]["refused"] is not None:
            assert item["ours"]["resources"] == {}
    # Microsoft's converter fills the patient's name on nearly every sample it has a Bundle for
    assert next(e for e in data["elements"] if e["element"] == "Patient.name")["microsoft"] > 0


def test_a_corpus_without_expected_bundles_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--corpus", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 2 and "ms/expected" in done.stderr
