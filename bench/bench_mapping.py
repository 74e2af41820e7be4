"""Mapping throughput per message type: HL7v2 → FHIR Bundle, then the same with R4B validation.

.venv/bin/python bench/bench_mapping.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.hl7.er7 import Message  # noqa: E402
from gateway.mapping import catalog  # noqa: E402
from gateway.mapping.engine import Library  # noqa: E402
from gateway.mapping.validate import bundle_errors  # noqa: E402
from tests.mapping.test_adt import A01, segment  # noqa: E402 - the authored test messages

PID = "PID|||552233^^^CHU-EST&1.2.250.1.71.4.2.2.4455&ISO^PI||GÉRARD^Zoé^^^^^L||19750425|F"


def msh(event: str) -> str:
    return f"MSH|^~\\&|APP|CHU-EST|PASSERELLE|GHT|20261123110000||{event}|X1|P|2.5|||||FRA|UNICODE UTF-8"


MESSAGES = {
    "ADT^A01": A01,
    "ORU^R01 (3 OBX)": "\r".join(
        [
            msh("ORU^R01^ORU_R01"),
            PID,
            segment(
                "OBR",
                {3: "CMD-42^LABO^1.2.250.1.71.4.2.2.4455^ISO", 4: "24331-1^Bilan lipidique^LN", 25: "F"},
            ),
            *(
                segment(
                    "OBX",
                    {
                        1: str(i),
                        2: "NM",
                        3: "2093-3^Cholestérol total^LN",
                        5: "5.2",
                        6: "mmol/L^^UCUM",
                        7: "3.5-6.5",
                        11: "F",
                    },
                )
                for i in range(1, 4)
            ),
        ]
    ),
    "SIU^S12": "\r".join(
        [
            msh("SIU^S12^SIU_S12"),
            PID,
            segment(
                "SCH", {2: "RDV-9^AGENDA^1.2.250.1.71.4.2.2.4455^ISO", 11: "^^^20261201093000^20261201100000"}
            ),
        ]
    ),
    "ORM^O01": "\r".join(
        [
            msh("ORM^O01^ORM_O01"),
            PID,
            segment(
                "ORC",
                {
                    1: "NW",
                    2: "CMD-77^SIH^1.2.250.1.71.4.2.2.4455^ISO",
                    12: "10000000001^MARTIN^Paul^^^^^^^^^^RPPS",
                },
            ),
            segment("OBR", {4: "24331-1^Bilan lipidique^LN"}),
        ]
    ),
    "VXU^V04": "\r".join(
        [
            msh("VXU^V04^VXU_V04"),
            PID,
            segment("ORC", {3: "VAC-3^SIH^1.2.250.1.71.4.2.2.4455^ISO"}),
            segment("RXA", {3: "20261110103000", 5: "3421012^VAXIGRIPTETRA^L", 20: "CP"}),
        ]
    ),
}


def rate(fn: object, seconds: float) -> float:
    # CPU time of this process, not wall time: on a shared machine the figure stays the rate of one
    # core, whatever else runs.
    n, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        fn()  # type: ignore[operator]
        n += 1
    return n / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    lib = Library.load(ROOT / "mappings", catalog.available())
    print(f"{'message':18} {'map only':>12} {'map + validate':>16}   (msg per CPU second, one core)")
    for name, text in MESSAGES.items():
        assert bundle_errors(lib.map(Message.decode((text + "\r").encode())).bundle) == []

        # Every message distinct (another patient id each time): nothing repeats from one message to
        # the next, so these are worst-case figures.
        def variant(text: str = text, counter: Iterator[int] = itertools.count()) -> bytes:  # noqa: B008
            # the counter is meant to live across calls: each call gets the next patient id
            return (text.replace("552233", f"P{next(counter):08d}") + "\r").encode()

        def map_only() -> None:
            lib.map(Message.decode(variant()))

        def map_validate() -> None:
            bundle_errors(lib.map(Message.decode(variant())).bundle)

        print(f"{name:18} {rate(map_only, args.seconds):12,.0f} {rate(map_validate, args.seconds):16,.0f}")


if __name__ == "__main__":
    main()
