"""Reading a webhook body within bounds: its size, a deadline, and how many are read at once.

What a client that stops sending holds, and for how long:

- **Time.** The whole body must arrive within ``PUBRELAY_HTTP__BODY_READ_TIMEOUT_S`` of the
  headers; then the request is cut (408 ``body_timeout``) and its connection closed.
- **Memory.** At most ``PUBRELAY_HTTP__MAX_CONCURRENT_BODIES`` bodies are received at once,
  and of those at most ``PUBRELAY_HTTP__MAX_CONCURRENT_LARGE_BODIES`` grow past
  :data:`LARGE_BODY_BYTES`. What the bodies being read hold is therefore bounded by
  construction: bodies x 64 KiB + large bodies x the body limit (about 96 MiB with the
  defaults), on top of what aiohttp reads from each socket before any handler runs (up to
  256 KiB; ``docs/performance.md``).
- **A whole body is simply taken.** A body already whole in aiohttp's buffer when the
  handler starts (a delivery of a few KiB usually arrives in the packet of its headers)
  holds nothing more by being read: it is taken at once, without a slot or a deadline, so
  clients holding every slot never refuse it.
- **Nothing else waits for it.** A Voucherify delivery is a few KiB: it needs no large-body
  slot, so clients stalled on large bodies never delay it. A request that finds its cap full
  is refused at once (503 ``busy`` + ``Retry-After``) rather than queued: a queue would hold
  the waiting connections and their buffers, and Voucherify retries a 503 anyway.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Final, Literal

from aiohttp import StreamReader, web

# Bodies up to this size need no large-body slot (the official example event is ~4.4 KB).
LARGE_BODY_BYTES: Final = 64 * 1024

Refusal = Literal["too_large", "busy", "body_timeout", "bad_request"]


@dataclass(frozen=True, slots=True)
class BodyRefused:
    """Why the body was not read: the request's outcome, a detail for the log line, and
    the guard that refused it (``pubrelay_webhook_refused_total``), if one did."""

    outcome: Refusal
    detail: str
    guard: str | None = None


_TOO_LARGE: Final = BodyRefused("too_large", "body over the limit")
_BUSY: Final = BodyRefused(
    "busy", "too many bodies being received at once", "max_concurrent_bodies"
)
_BUSY_LARGE: Final = BodyRefused(
    "busy", "too many large bodies being received at once", "max_concurrent_large_bodies"
)


_UNREADABLE: Final = (ConnectionError, ValueError, web.RequestPayloadError)


def _unreadable(err: Exception) -> BodyRefused:
    return BodyRefused("bad_request", f"could not read the body: {err}")


class BodyReader:
    """Reads request bodies for one application; counts the bodies being read."""

    def __init__(
        self,
        *,
        max_bytes: int,
        timeout_s: float,
        max_bodies: int,
        max_large_bodies: int,
    ) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_bodies = max_bodies
        self.max_large_bodies = max_large_bodies
        self._at_once_bytes = min(max_bytes, LARGE_BODY_BYTES)
        self.reading = 0
        self.reading_large = 0

    async def read(self, request: web.BaseRequest) -> bytes | BodyRefused:
        """The raw body, or why it was refused; a declared length over the limit is
        refused before anything is read."""
        declared = request.content_length
        if (at_once := self._at_once(request.content, declared)) is not None:
            return at_once
        if self.reading >= self.max_bodies:
            return _BUSY
        self.reading += 1
        large = False
        try:
            async with asyncio.timeout(self.timeout_s):
                if (declared or 0) > LARGE_BODY_BYTES:
                    large = self._take_large_slot()
                    if not large:
                        return _BUSY_LARGE
                body = bytearray()
                async for chunk in request.content.iter_any():
                    body += chunk
                    if len(body) > self.max_bytes:
                        return _TOO_LARGE
                    if len(body) > LARGE_BODY_BYTES and not large:
                        large = self._take_large_slot()
                        if not large:
                            return _BUSY_LARGE
                return bytes(body)
        except TimeoutError:
            return BodyRefused(
                "body_timeout",
                f"the body did not arrive within {self.timeout_s:g} s",
                "body_read_timeout",
            )
        except _UNREADABLE as err:
            return _unreadable(err)
        finally:
            self.reading -= 1
            if large:
                self.reading_large -= 1

    def _at_once(self, content: StreamReader, declared: int | None) -> bytes | BodyRefused | None:
        """What is known before waiting: a declared length over the limit, or a body
        already whole in aiohttp's buffer (a delivery of a few KiB usually arrives with
        its headers), taken as it is, without a deadline or a slot."""
        if declared is not None and declared > self.max_bytes:
            return _TOO_LARGE
        if not content.is_eof() or content.total_bytes > self._at_once_bytes:
            return None
        try:
            return content.read_nowait()
        except _UNREADABLE as err:
            return _unreadable(err)

    def _take_large_slot(self) -> bool:
        if self.reading_large >= self.max_large_bodies:
            return False
        self.reading_large += 1
        return True
