"""`tune_malloc`: buffers of a few hundred KB, as a Kafka produce request and its copies
are, stop faulting fresh pages in on every request (docs/performance.md, "Page faults of
large batches"). Each case runs in a process of its own: malloc's settings are global."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# 200 rounds of the copies a 256 KB produce request goes through, then the page faults.
_PROGRAM = """
import os, resource, sys
from pubrelay.runtime import tune_malloc
tuned = tune_malloc() if sys.argv[1] == "tune" else None
chunk = os.urandom(4000)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    batch = b"".join([chunk] * 64)
    framed = bytes(4) + batch
    request = b"".join([framed, batch])
    del batch, framed, request
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env: str) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    tuned, faults = done.stdout.split()
    return tuned, int(faults)


pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")


def test_large_buffers_stop_faulting_pages_in() -> None:
    _, untuned = _faults("as-is")
    if untuned < 5_000:
        pytest.skip(f"this C library does not map such buffers anew ({untuned} faults)")
    tuned, faults = _faults("tune")
    assert tuned == "True"
    assert faults < untuned / 10, (faults, untuned)


def test_malloc_tuned_by_the_environment_is_left_alone() -> None:
    tuned, _ = _faults("tune", MALLOC_TRIM_THRESHOLD_="131072")
    assert tuned == "False"
