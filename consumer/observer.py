"""What the intake tells an observer (the console's event index) about each verified request.

The intake calls :meth:`IntakeObserver.received` once per request whose body was verified,
after the answer is decided: a plain method call that must neither block nor raise (the
console's recorder appends to a bounded queue and writes in batches off the request path).
Requests refused before their signature held are never reported.
"""

from __future__ import annotations

from typing import Protocol

from schemas.record import Headers


class IntakeObserver(Protocol):
    def received(
        self, *, topic: str, headers: Headers, body: bytes, status: int, outcome: str
    ) -> None:
        """One verified request: the record's topic and headers, the body, the answer."""
        ...
