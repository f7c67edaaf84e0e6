"""The dead-letter format, written and read in this one module.

A dead letter is the original record (value, key, headers) plus ``dlq-*`` headers that say
why and when it failed, published to the handler's dead-letter topic
``<prefix>dlq.<handler>`` (:func:`schemas.topics.dlq_topic`). The worker writes the headers
with :func:`dead_letter_headers` (:func:`error_text` and :func:`error_type_name` give the
error's values); ``pubrelay dlq list`` and ``pubrelay replay`` read a record back as a
:class:`DeadLetter`, and replay sends it on with :attr:`DeadLetter.original_headers`.
Header values are UTF-8 text.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from bus.types import Message
from handlers.worker.error_text import error_message
from schemas.masking import mask_emails
from schemas.record import HEADER_EVENT_ID, HEADER_EVENT_TYPE, Headers, header_text
from schemas.timestamps import parse_timestamp

# The dead-letter headers added to the original record's headers.
DLQ_HEADER_PREFIX: Final = "dlq-"
DLQ_ERROR: Final = "dlq-error"
DLQ_ERROR_TYPE: Final = "dlq-error-type"
DLQ_ATTEMPTS: Final = "dlq-attempts"
DLQ_FIRST_FAILED_AT: Final = "dlq-first-failed-at"
DLQ_LAST_FAILED_AT: Final = "dlq-last-failed-at"
DLQ_HANDLER: Final = "dlq-handler"
DLQ_SOURCE_TOPIC: Final = "dlq-source-topic"

MAX_ERROR_CHARS: Final = 2000


def error_text(err: BaseException) -> str:
    """The ``dlq-error`` value: ``<class name>: <message>``, at most 2000 characters."""
    # The dead-letter header is printed by `pubrelay dlq list`: no full customer address
    # (a pydantic error quotes the input, an SMTP reply the recipient).
    text = mask_emails(f"{type(err).__name__}: {error_message(err)}")
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def error_type_name(err: BaseException) -> str:
    """The ``dlq-error-type`` value: the error class's full dotted name."""
    cls = type(err)
    return f"{cls.__module__}.{cls.__qualname__}"


def dead_letter_headers(
    original: Headers,
    *,
    error: str,
    error_type: str,
    attempts: int,
    first_failed_at: str,
    last_failed_at: str,
    handler: str,
    source_topic: str,
) -> Headers:
    """The original headers (any old ``dlq-*`` removed) plus this failure's ``dlq-*``.

    Values are UTF-8; what UTF-8 cannot encode (a lone surrogate quoted in an error
    message) becomes a ``\\udxxx`` escape instead of failing the dead letter.
    """
    kept = _without_dlq_headers(original)
    added = (
        (DLQ_ERROR, error),
        (DLQ_ERROR_TYPE, error_type),
        (DLQ_ATTEMPTS, str(attempts)),
        (DLQ_FIRST_FAILED_AT, first_failed_at),
        (DLQ_LAST_FAILED_AT, last_failed_at),
        (DLQ_HANDLER, handler),
        (DLQ_SOURCE_TOPIC, source_topic),
    )
    return (*kept, *((k, v.encode("utf-8", "backslashreplace")) for k, v in added))


def _without_dlq_headers(headers: Headers) -> Headers:
    return tuple((k, v) for k, v in headers if not k.startswith(DLQ_HEADER_PREFIX))


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of a dead-letter topic, with its ``dlq-*`` facts decoded."""

    message: Message
    event_id: str | None
    event_type: str | None
    error: str | None
    error_type: str | None
    attempts: int | None
    first_failed_at: datetime | None
    last_failed_at: datetime | None
    source_topic: str | None

    @classmethod
    def from_message(cls, message: Message) -> DeadLetter:
        headers = message.headers
        attempts = header_text(headers, DLQ_ATTEMPTS)
        return cls(
            message=message,
            event_id=header_text(headers, HEADER_EVENT_ID),
            event_type=header_text(headers, HEADER_EVENT_TYPE),
            error=header_text(headers, DLQ_ERROR),
            error_type=header_text(headers, DLQ_ERROR_TYPE),
            attempts=int(attempts) if attempts and attempts.isdigit() else None,
            first_failed_at=parse_timestamp(header_text(headers, DLQ_FIRST_FAILED_AT)),
            last_failed_at=parse_timestamp(header_text(headers, DLQ_LAST_FAILED_AT)),
            source_topic=header_text(headers, DLQ_SOURCE_TOPIC),
        )

    @property
    def original_headers(self) -> Headers:
        """The headers the record had before it was dead-lettered."""
        return _without_dlq_headers(self.message.headers)

    def failed_since(self, since: datetime) -> bool:
        when = self.last_failed_at or datetime.fromtimestamp(
            self.message.timestamp_ms / 1000, tz=UTC
        )
        return when >= (since if since.tzinfo else since.replace(tzinfo=UTC))
