"""Longer fuzz runs than CI's: the hostile-input tests of tests/ops/test_fuzz.py with more examples.

    .venv/bin/python bench/fuzz.py [EXAMPLES]      # default 2000 per test; or `make fuzz`

Prints, per test, how long it ran; any failure is hypothesis's minimal falsifying example.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    examples = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    env = {**os.environ, "PASSERELLE_FUZZ_EXAMPLES": str(examples)}
    started = time.monotonic()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--timeout",
            "0",
            "--durations=0",
            "tests/ops/test_fuzz.py",
            "tests/hl7/test_er7_properties.py",
            "tests/mllp/test_framing.py",
        ],
        cwd=ROOT,
        env=env,
        check=False,
    )
    print(f"fuzz: {examples} examples per test, {time.monotonic() - started:.0f} s, exit {run.returncode}")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
