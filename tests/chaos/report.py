"""One row per scenario, how "repeated" and "lost" are counted, and the printed table.

- **effects**: distinct events whose effect was observed (an e-mail in the SMTP mailbox, a
  contact update at HubSpot, a request at the forward receiver), keyed by event.
- **repeated**: events whose effect was observed more than once, except those of the
  crash window.
- **crash window**: repeats of the one window docs/reliability.md documents: the effect
  landed, then the worker was SIGKILLed before its ledger recorded it, and the event's
  next delivery after the restart ran it again (only the worker-kill scenario kills
  workers mid-call). Shown, never hidden; the size of the window is in the note.
- **lost**: events that got a 2xx or are on the event topic, and have neither their effect
  nor a dead letter where one is expected.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

COLUMNS: Final = (
    "scenario",
    "events sent",
    "2xx",
    "stored",
    "effects",
    "repeated",
    "crash window",
    "lost",
    "peak RSS",
    "note",
)


@dataclass
class Row:
    scenario: str
    sent: int = 0
    accepted: int | None = None  # None: the events were not posted (a backlog)
    stored: int = 0
    effects: int = 0
    repeated: int = 0
    crash_window: int = 0
    lost: int = 0
    peak_rss_mib: float = 0.0
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.repeated == 0 and self.lost == 0

    def count(
        self,
        effects: Counter[str],
        *,
        expected: Iterable[str],
        dead: Iterable[str] = (),
    ) -> list[str]:
        """Fill effects, repeated and lost; the lost event ids (sorted)."""
        self.effects = len(effects)
        self.repeated = sum(1 for n in effects.values() if n > 1)
        lost = set(expected) - set(effects) - set(dead)
        self.lost = len(lost)
        return sorted(lost)

    def note_repeated_and_lost(self, effects: Mapping[str, int], lost: Sequence[str]) -> None:
        """Add to the notes a few of the events with more than one effect, and of ``lost``."""
        repeated = sorted(e for e, n in effects.items() if n > 1)
        if repeated:
            self.notes.append(f"repeated: {few(repeated)}")
        if lost:
            self.notes.append(f"lost: {few(lost)}")

    def cells(self) -> list[str]:
        note = "; ".join(self.notes)
        if self.error is not None:
            note = f"ERROR: {self.error}" + (f"; {note}" if note else "")
        note += f" ({self.seconds:.0f} s)"
        return [
            self.scenario,
            f"{self.sent:,}",
            "-" if self.accepted is None else f"{self.accepted:,}",
            f"{self.stored:,}",
            f"{self.effects:,}",
            str(self.repeated),
            str(self.crash_window),
            str(self.lost),
            f"{self.peak_rss_mib:.0f} MiB" if self.peak_rss_mib else "-",
            note.strip(),
        ]


def table(rows: Sequence[Row]) -> str:
    """A Markdown table: readable in a terminal and pasted as is into docs/reliability.md."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def few(ids: Sequence[str], shown: int = 3) -> str:
    """At most ``shown`` ids for a note, with how many more there are."""
    more = f" (+{len(ids) - shown})" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more
