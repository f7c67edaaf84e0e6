"""The machine-readable side of `make bench`: every printed figure, kept for a JSON file.

A section calls :func:`record` for each figure it prints, with the baseline it was
measured against in the same run (the machine's speed drifts by up to 2x over minutes,
so the ratio is what compares across runs) and, where the project has one, its target.
``python -m tests.bench`` writes them all to ``--results`` (default
``build/bench-results.json``) at the end of the run.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Figure:
    """One measured figure beside its same-run baseline."""

    section: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str | None = None
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None
    extra: dict[str, float] | None = None


_FIGURES: list[Figure] = []


def record(
    section: str,
    name: str,
    value: float,
    unit: str,
    *,
    baseline: float | None = None,
    baseline_name: str | None = None,
    ratio: float | None = None,
    target: str | None = None,
    met: bool | None = None,
    extra: dict[str, float] | None = None,
) -> Figure:
    """Keep a figure for the results file; ``ratio`` defaults to value / baseline."""
    if ratio is None and baseline:
        ratio = value / baseline
    figure = Figure(section, name, value, unit, baseline, baseline_name, ratio, target, met, extra)
    _FIGURES.append(figure)
    return figure


def figures() -> list[Figure]:
    return list(_FIGURES)


def write(path: Path, *, sections: list[str] | None = None, short: bool = False) -> None:
    """Write every recorded figure, with when and where they were measured, the sections
    that ran (a figure missing from them was not measured) and whether at ``--short``
    sizes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "sections": sections,
        "short": short,
        "figures": [asdict(f) for f in _FIGURES],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
