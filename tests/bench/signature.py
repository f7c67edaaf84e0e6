"""`python -m tests.bench.signature`: what a bogus-signed 1 MiB body costs the event loop.

For each hostile 1 MiB body (``tests/fixtures/hostile.py``) and the two costliest bodies
the whitespace-stripped check is still tried on, the median time of ``Verifier.verify``
with a wrong signature, beside the HMAC of 1 MiB measured in the same run (the number to
compare across runs is the ratio).
"""

from __future__ import annotations

import hmac
import json
import statistics
import time
from collections.abc import Callable
from functools import partial

from consumer.signature import MAX_NORMALISED_BYTES, MAX_NORMALISED_TOKENS, Verifier
from tests.fixtures.hostile import hostile_bodies

SECRET = "bench-secret"
MIB = 1024 * 1024
RUNS = 15


def median_ms(work: Callable[[], object]) -> float:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def at_the_bound() -> dict[str, bytes]:
    """The costliest bodies the second check is still tried on: as large as
    ``MAX_NORMALISED_BYTES`` allows, with as many quotes as ``MAX_NORMALISED_TOKENS`` lets
    through, then whitespace (larger ones cost one HMAC: the rows above)."""
    size = MAX_NORMALISED_BYTES
    head = json.dumps([f"s{i}" for i in range(MAX_NORMALISED_TOKENS // 2)], indent=1).encode()
    kib = size // 1024
    return {
        f"{kib} KiB: {MAX_NORMALISED_TOKENS} quotes, spaces": head + b" " * (size - len(head)),
        f"{kib} KiB: {MAX_NORMALISED_TOKENS} quotes, a a a…": head
        + (b"a " * size)[: size - len(head)],
    }


def main() -> None:
    verifier = Verifier([SECRET])
    bodies = {**hostile_bodies(MIB), **at_the_bound()}
    baseline = median_ms(
        lambda: hmac.digest(SECRET.encode(), bodies["no whitespace: xxx…"], "sha256")
    )
    print(f"{'body (bogus signature)':40} {'verify ms':>10} {'x HMAC':>8}")
    print(f"{'HMAC-SHA256 of 1 MiB (the baseline)':40} {baseline:10.2f} {1:8.1f}")
    for name, body in bodies.items():
        cost = median_ms(partial(verifier.verify, body, "0" * 64))
        print(f"{name:40} {cost:10.2f} {cost / baseline:8.1f}")


if __name__ == "__main__":
    main()
