"""The table `make bench` ends with: issue 13's figures, each beside its same-run baseline.

One row per figure of the issue's table, found among the recorded figures
(:mod:`tests.bench.results`) by section and by words of its name; a row whose section did
not run reads "not run", one whose section ran without that figure "no figure".
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from tests.bench.results import Figure


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    section: str
    words: tuple[str, ...]
    """Every one of them is in the figure's name."""

    def find(self, figures: Sequence[Figure]) -> Figure | None:
        return next(
            (
                f
                for f in figures
                if f.section == self.section and all(w in f.name for w in self.words)
            ),
            None,
        )


ROWS: tuple[Row, ...] = (
    Row("intake, embedded bus: req/s vs bare", "intake", ("embedded SQLite bus, requests/s",)),
    Row("intake, embedded bus: p99", "intake", ("embedded SQLite bus, p99",)),
    Row("intake, Kafka (acks=all): req/s vs bare", "kafka", ("Kafka", "requests/s")),
    Row("worker, SQLite ledger, no-op handler", "worker", ("sqlite:", "SQLite ledger")),
    Row("POST -> e-mail, open loop: p99", "e2e", ("e-mail accepted", "open loop", "p99")),
    Row("RSS under sustained load (peak)", "memory", ("peak RSS",)),
    Row("RSS draining a backlog (peak)", "backlog", ("peak RSS",)),
)

_WIDTHS = (40, 14, 14, 6, 46, 3)


def _number(value: float, unit: str) -> str:
    shown = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.2f}"
    short = {"requests/s": "/s", "events/s": "/s"}.get(unit, f" {unit}")
    return shown + short


def _line(cells: Sequence[str]) -> str:
    return "  ".join(f"{c:<{w}}" for c, w in zip(cells, _WIDTHS, strict=True)).rstrip()


def summary_lines(figures: Sequence[Figure], sections_run: Collection[str]) -> list[str]:
    lines = [
        "# summary: issue 13's figures, each beside its baseline from the same run",
        _line(("figure", "value", "baseline", "ratio", "target", "met")),
    ]
    for row in ROWS:
        figure = row.find(figures)
        if row.section not in sections_run or figure is None:
            status = "not run" if row.section not in sections_run else "no figure"
            lines.append(_line((row.label, status, "", "", "", "")))
            continue
        lines.append(
            _line(
                (
                    row.label,
                    _number(figure.value, figure.unit),
                    "-" if figure.baseline is None else _number(figure.baseline, figure.unit),
                    "-" if figure.ratio is None else f"{figure.ratio:.2f}",
                    figure.target or "-",
                    "-" if figure.met is None else ("yes" if figure.met else "no"),
                )
            )
        )
    return lines
