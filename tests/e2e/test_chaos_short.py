"""`python -m tests.chaos --short` as `make test` runs it: every fault scenario at a small
size, against real processes; its table must show 0 repeated and 0 lost in every row.

The full sizes (a 60 s SMTP outage, a minute of HubSpot 429s, a 200k-event backlog) are
`make chaos`; docs/reliability.md says what each scenario proves.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.chaos.__main__ import SCENARIOS
from tests.chaos.report import COLUMNS

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 600


def table_rows(output: str) -> list[dict[str, str]]:
    """The harness's Markdown table, as one dict per row (header and rule skipped)."""
    lines = [line for line in output.splitlines() if line.startswith("| ")]
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[1:]]
    return [dict(zip(COLUMNS, cells, strict=True)) for cells in rows]


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_every_short_chaos_scenario_ends_with_nothing_repeated_and_nothing_lost() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--short"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    rows = table_rows(done.stdout)
    report = f"{done.stdout}\n--- stderr (tail)\n{done.stderr[-6000:]}"
    assert len(rows) == len(SCENARIOS), report
    bad = [r for r in rows if r["repeated"] != "0" or r["lost"] != "0" or "ERROR" in r["note"]]
    assert bad == [], report
    assert all(r["effects"] != "0" for r in rows), report
    assert done.returncode == 0, report
