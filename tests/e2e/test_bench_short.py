"""`python -m tests.bench --short` as `make test` runs it: every section at a tiny size
(but the attack, whose defences tests/e2e/test_webhook_slow_clients.py covers), into a
results file that must hold, for each section run, a figure beside its same-run baseline.

Speed is not asserted: only that `make bench` still runs and records what issue 13 asks for.
The full sizes are `make bench`; docs/performance.md holds their figures.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench.summary import ROWS

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 240
WRK_SECTIONS = {"intake", "kafka"}
SECTIONS = ["intake", "kafka", "worker", "e2e", "retention", "memory", "backlog"]


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_short_bench_records_a_figure_with_its_baseline_for_every_section_run(
    tmp_path: Path,
) -> None:
    sections = SECTIONS
    if shutil.which("wrk") is None:  # `make test` installs it (Makefile: system-deps)
        sections = [s for s in SECTIONS if s not in WRK_SECTIONS]
    results = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--short", "--results", str(results), *sections],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(results.read_text())["figures"]
    for section in sections:
        mine = [f for f in figures if f["section"] == section]
        assert mine, f"section {section} recorded no figure"
        compared = [f for f in mine if f["baseline"] and f["ratio"]]
        assert compared, f"section {section} recorded no figure beside a baseline: {mine}"
        for figure in compared:
            assert min(figure["value"], figure["baseline"], figure["ratio"]) > 0, figure
    summary = done.stdout[done.stdout.index("# summary") :]
    for row in ROWS:
        line = next(line for line in summary.splitlines() if line.startswith(row.label))
        assert ("not run" in line) == (row.section not in sections), line
        assert "no figure" not in line, line
