"""Client-side rate limiting for the built-in handlers that call rate-limited services."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque


class RateLimiter:
    """At most ``max_requests`` starts in any ``window_s``; ``pause`` when the server says so.

    A sliding log of start times. The ``crm`` handler keeps under HubSpot's rolling 10 s
    window (shared by every app of the portal), sparing 429s; the ``email`` handler paces
    messages with ``RateLimiter(1, 1 / per_s)``, starts at least ``1 / per_s`` apart,
    because relays punish bursts with 4xx.

    A pause asked for by a server lasts at most ``max_pause_s`` (``inf``, ``nan`` or a
    year from a hostile header never stops the handler for longer).
    """

    def __init__(self, max_requests: int, window_s: float, *, max_pause_s: float = 300.0) -> None:
        self.max_requests = max_requests
        self.window_s = window_s
        self.max_pause_s = max_pause_s
        self._starts: deque[float] = deque()
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def pause(self, delay_s: float) -> None:
        """No request starts for ``delay_s`` (HubSpot said so), at most ``max_pause_s``."""
        if math.isnan(delay_s) or delay_s <= 0:
            return
        delay_s = min(delay_s, self.max_pause_s)
        self._paused_until = max(self._paused_until, time.monotonic() + delay_s)

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                while self._starts and self._starts[0] <= now - self.window_s:
                    self._starts.popleft()
                if self._paused_until > now:
                    await asyncio.sleep(self._paused_until - now)
                    continue
                if len(self._starts) < self.max_requests:
                    self._starts.append(now)
                    return
                await asyncio.sleep(self._starts[0] + self.window_s - now)
