"""How a webhook request ends: the HTTP answer, and the outcome it is counted and logged by.

The answers every request may get are here; those that depend on settings (the body
limit, ``Retry-After``) are built once by :class:`consumer.webhook.Intake`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from consumer.signature import MAX_NORMALISED_BYTES, MAX_NORMALISED_TOKENS
from schemas.errors import RecordTooLarge


@dataclass(frozen=True, slots=True)
class Answer:
    """How a request ends: the HTTP answer, and the outcome it is counted and logged by.

    ``outcome`` is also the ``status`` of the JSON body, ``reason`` its ``reason`` (why
    an event was quarantined, so ``pubrelay send`` can say it); ``signature_present`` and
    ``error`` are added to the log line when set. ``close`` ends the connection after the
    answer (a body that was not read to its end).
    """

    status: int
    outcome: str
    message: str | None = None
    retry_after: str | None = None
    signature_present: bool | None = None
    error: str | None = None
    close: bool = False
    reason: str | None = None

    def response(self) -> web.Response:
        response = web.Response(
            body=json_body(self.outcome, self.reason, self.message),
            status=self.status,
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
        if self.retry_after is not None:
            response.headers["Retry-After"] = self.retry_after
        if self.close:
            response.force_close()
        return response

    def log_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {"outcome": self.outcome}
        if self.signature_present is not None:
            fields["signature_present"] = self.signature_present
        if self.error is not None:
            fields["error"] = self.error
        return fields


@functools.lru_cache(maxsize=256)
def json_body(outcome: str, reason: str | None, message: str | None) -> bytes:
    """The JSON body of an answer; built once per distinct answer (a small, fixed set)."""
    body = {"status": outcome}
    if reason is not None:
        body["reason"] = reason
    if message is not None:
        body["message"] = message
    return json.dumps(body).encode()


FORBIDDEN: Final = Answer(403, "forbidden", "source address is not in the allowlist")
NOT_NORMALISED: Final = (
    "the signature does not match the body as received, and the body is over "
    f"{MAX_NORMALISED_BYTES} bytes or holds more than {MAX_NORMALISED_TOKENS} quotes and "
    "backslashes: the check without whitespace was not tried"
)
ACCEPTED: Final = Answer(202, "accepted")
QUARANTINED: Final = Answer(202, "quarantined", "kept on the quarantine topic")


def quarantined(reason: str) -> Answer:
    """202 ``quarantined``, with the reason in the body (a fixed set: consumer/metrics.py)."""
    return Answer(202, "quarantined", QUARANTINED.message, reason=reason)


INTERNAL_ERROR: Final = Answer(500, "error", "internal error; the event was not accepted")


def too_large_for_bus(err: RecordTooLarge) -> Answer:
    """413: the bus refuses this record for its size and always will, so a 503 would only
    make Voucherify retry until it disables the webhook. A quarantine record would carry
    the same body and be refused the same way; the log line names the event."""
    return Answer(
        413,
        "record_too_large",
        "the event store refuses a body this large; it was not stored",
        error=str(err),
    )
