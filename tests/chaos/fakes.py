"""The third parties of the chaos scenarios, with the faults the scenarios need.

Each is a fixture of ``tests/fixtures/`` with one knob added, so the contract it enforces
stays the fixture's: :class:`PoisonReceiver` (the ``http`` handler's receiver, answering
503 forever to chosen event ids), :class:`ThrottledHubSpot` (HubSpot answering 429 to
four calls in five until a moment), :class:`SlowSmtpServer` (aiosmtpd delaying the reply
to some DATA). Each one's ``effects()`` counts what it received per event id. The aiohttp
ones run in :class:`LoopThread`, an event loop of their own in a thread, so the harness's
own loop (the senders) never delays them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session

from tests.chaos.load import by_event
from tests.fixtures.fake_hubspot import FakeHubSpot, serve
from tests.fixtures.fake_receiver import PATH, FakeReceiver
from tests.fixtures.smtp import HOST, SERVER_NAME, SmtpServer, _Controller, _CountingSMTP, _Handler

T = TypeVar("T")

_CALL_TIMEOUT_S = 30.0


class LoopThread:
    """An asyncio loop in a daemon thread; :meth:`call` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._runners: list[web.AppRunner] = []

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(_CALL_TIMEOUT_S)

    def serve(self, app: web.Application) -> str:
        """Serve ``app`` on a free loopback port; its base URL."""
        runner, url = self.call(serve(app))
        self._runners.append(runner)
        return url

    def close(self) -> None:
        for runner in self._runners:
            self.call(runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(_CALL_TIMEOUT_S)
        self.loop.close()


@dataclass
class PoisonReceiver(FakeReceiver):
    """A :class:`FakeReceiver` that answers 503 to every delivery of ``poison`` event ids,
    and remembers when each request it stored arrived."""

    poison: set[str] = field(default_factory=set)
    poison_attempts: Counter[str] = field(default_factory=Counter)
    arrivals: list[tuple[str, float]] = field(default_factory=list)
    """``(event id, time.monotonic())`` of every request stored."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._poisoned)
        return app

    async def _poisoned(self, request: web.Request) -> web.Response:
        event_id = request.headers.get("X-Pubrelay-Event-Id", "")
        if event_id in self.poison:
            await request.read()
            self.poison_attempts[event_id] += 1
            return web.Response(status=503, text="poison event: never accepted")
        response = await self._handle(request)
        if response.status == 204:
            self.arrivals.append((event_id, time.monotonic()))
        return response

    def start(self, loop: LoopThread) -> None:
        self.url = loop.serve(self.app()) + PATH

    def effects(self) -> Counter[str]:
        return Counter(event_id for event_id, _ in list(self.arrivals))

    def env(self) -> dict[str, str]:
        return {"PUBRELAY_FORWARD__URL": self.url, "PUBRELAY_FORWARD__SECRET": self.secret}


@dataclass
class ThrottledHubSpot(FakeHubSpot):
    """A :class:`FakeHubSpot` answering 429 ``Retry-After: 1`` to four calls in five
    until ``throttle_until`` (``time.monotonic``); its own rolling limit as usual after."""

    throttle_until: float = 0.0
    throttled: int = 0
    _calls: int = 0

    def _rate_limited(self) -> web.Response | None:
        if time.monotonic() < self.throttle_until:
            self._calls += 1
            if self._calls % 5:
                self.throttled += 1
                body = {
                    "status": "error",
                    "message": "You have reached your ten_secondly_rolling limit.",
                    "errorType": "RATE_LIMIT",
                    "policyName": "TEN_SECONDLY_ROLLING",
                }
                headers = {"Retry-After": "1", "X-HubSpot-RateLimit-Remaining": "0"}
                return web.json_response(body, status=429, headers=headers)
        return super()._rate_limited()

    def start(self, loop: LoopThread) -> None:
        self.url = loop.serve(self.app())

    def effects(self) -> Counter[str]:
        """Contact updates HubSpot accepted, per event (each event has its own address)."""
        return by_event(Counter(email.lower() for r in list(self.upserts) for email in r.ids))

    def env(self) -> dict[str, str]:
        return {"PUBRELAY_CRM__TOKEN": self.token, "PUBRELAY_CRM__BASE_URL": self.url}


class _SlowHandler(_Handler):
    async def handle_DATA(self, server: _CountingSMTP, session: Session, envelope: Envelope) -> str:
        owner = self.server
        assert isinstance(owner, SlowSmtpServer)
        delay = owner.next_delay()
        if delay:
            await asyncio.sleep(delay)
        return await super().handle_DATA(server, session, envelope)


class _SlowController(_Controller):
    def __init__(self, owner: SmtpServer, **kwargs: Any) -> None:
        Controller.__init__(self, _SlowHandler(owner), **kwargs)
        self.owner = owner


class SlowSmtpServer(SmtpServer):
    """A plain :class:`SmtpServer` whose reply to every ``slow_every``-th DATA waits
    ``delay_s`` (0: none); the message is stored only after the wait, as a relay does."""

    def __init__(self, *, delay_s: float = 0.0, slow_every: int = 0) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.slow_every = slow_every
        self.delayed = 0
        self._data_commands = 0

    def next_delay(self) -> float:
        with self._lock:
            self._data_commands += 1
            if self.slow_every and self.delay_s and self._data_commands % self.slow_every == 0:
                self.delayed += 1
                return self.delay_s
        return 0.0

    def effects(self) -> Counter[str]:
        """Messages in the mailbox, per event (each event has its own recipient)."""
        with self._lock:
            per_recipient = Counter(to.lower() for m in self.mailbox for to in m.rcpt_tos)
        return by_event(per_recipient)

    def env(self) -> dict[str, str]:
        return {
            "PUBRELAY_EMAIL__SMTP_URL": self.url,
            "PUBRELAY_EMAIL__SENDER": "Chaos Shop <coupons@shop.example>",
            "PUBRELAY_EMAIL__MAX_PER_S": "0",
            "PUBRELAY_EMAIL__CONNECTIONS": "8",
            "PUBRELAY_EMAIL__TIMEOUT_S": "30",
        }

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Started for the block, stopped when it ends (however it ends)."""
        self.start()
        try:
            yield
        finally:
            self.stop()

    def start(self) -> None:
        if self.delay_s == 0.0:
            super().start()
            return
        controller = _SlowController(
            self, hostname=HOST, port=self.port, server_hostname=SERVER_NAME, ready_timeout=5.0
        )
        controller.start()
        self._controller = controller
        with self._lock:
            self.sessions = 0
            self._connections.clear()
