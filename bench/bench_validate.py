"""Validation speed: FR Core Patient INS resources per second and PAM FR messages per second.

    .venv/bin/python bench/bench_validate.py [--seconds 3]

Each profile is compiled once (first call, not timed). The FHIR figure is given twice: with the
R4B base model (fhir.resources, what `passerelle validate` runs) and the profile checks alone.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import orjson

from conformance.fhir.registry import default_registry
from conformance.hl7v2.validator import validate_hl7
from conformance.suite import DATA_DIR


def rate(fn: Callable[[], Any], seconds: float) -> float:
    fn()  # compile and warm up
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(50):
            fn()
        count += 50
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    registry = default_registry()
    patient = orjson.loads((DATA_DIR / "fhir" / "patient-ins.json").read_bytes())
    assert registry.validate(patient) == [], "the benchmark resource must conform"
    messages = [
        p.read_bytes() for p in sorted((DATA_DIR / "hl7").glob("*.hl7")) if not p.stem.startswith("bad-")
    ]
    # the conforming ones (warnings allowed: a field over its v2.5 length); the suite's messages that
    # break one PAM FR rule on purpose are left out
    messages = [m for m in messages if not any(f.is_error for f in validate_hl7(m))]
    assert len(messages) >= 10, "the benchmark needs the suite's conforming messages"
    turn = iter(range(1 << 62))

    def one_message() -> None:
        validate_hl7(messages[next(turn) % len(messages)])

    full = rate(lambda: registry.validate(patient), args.seconds)
    profile_only = rate(lambda: registry.validate(patient, base=False), args.seconds)
    hl7 = rate(one_message, args.seconds)
    print(f"FR Core Patient INS (R4B base model + profile): {full:10,.0f} resources/s")
    print(f"FR Core Patient INS (profile checks only):      {profile_only:10,.0f} resources/s")
    print(f"PAM FR 2.11 ADT (v2.5 structure + PAM FR rules): {hl7:9,.0f} messages/s  ({len(messages)} kinds)")


if __name__ == "__main__":
    main()
