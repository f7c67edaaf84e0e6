"""The webhook's own HTTP/1.1 layer, in front of aiohttp.

Why: aiohttp's request and response machinery costs ~45 µs of server CPU per request,
where ``httptools`` (llhttp, the parser aiohttp wraps too) behind a bare protocol costs ~9
µs; that difference is most of what kept the intake under half the speed of a bare aiohttp
handler (docs/performance.md, "The webhook's own HTTP layer").

What it serves, and what it hands over. Each connection starts here. A request is served
here only in the one shape Voucherify sends: ``POST <webhook path>`` over HTTP/1.0 or 1.1,
one ``Content-Length`` (at most ``LARGE_BODY_BYTES``, within ``max_body_bytes``), no
``Transfer-Encoding``, ``Expect`` or ``Upgrade``, headers within the configured limits,
and its body arrived whole with its head. Anything else (other routes, the console,
chunked or large bodies, a body still arriving, a malformed or oversized head) hands the
connection to aiohttp from that request's first byte on: the bytes not yet served go to an
aiohttp request handler that takes the transport over, and aiohttp's own guards apply
(413, 408, lingering, the body caps). A connection never comes back. Requests are
delimited by ``Content-Length`` only, so the bytes handed over start exactly where
aiohttp's parser expects a request: the two parsers never disagree on where one ends.

Bounds: a head must complete within ``keepalive_timeout_s`` of the connection's opening or
its previous answer (then the connection is closed; aborted if answers are still unwritten
because the client stopped reading), and fit in ``max_headers`` lines of
``max_header_bytes`` each, its request line in :data:`MAX_LINE_BYTES` (aiohttp's); a
request whose body has not arrived whole with its head is handed over (aiohttp reads it
with its deadline and its caps). A connection holds at most one head's and one body's
bytes unserved: past that, reading pauses until they are served, whether a request is
being answered or each is refused at once. Reading pauses too, and no request is taken,
while the transport holds more unwritten answers than its high-water mark (a client
pipelining without reading). One request per connection at a time, answered in order
(pipelining). Once :meth:`WebhookServer.shutdown` starts, an answer under way goes with
``Connection: close`` and no further request is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from typing import TYPE_CHECKING, Any, Final, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from consumer.answers import json_body
from consumer.body import LARGE_BODY_BYTES

if TYPE_CHECKING:
    from aiohttp import web

    from consumer.answers import Answer
    from consumer.config import HttpSettings
    from consumer.webhook import Intake

_HEAD_END: Final = b"\r\n\r\n"
MAX_LINE_BYTES: Final = 8190
"""The longest request line served here: aiohttp's limit, so a longer one gets its 400."""
_SERVER: Final = b"Server: pubrelay\r\n"
_MAX_ANSWERS: Final = 256
"""Distinct answers kept built (there are a few dozen: the outcomes, the quarantine reasons)."""
_REASONS: Final = {
    202: b"Accepted",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


class _Request:
    """What the intake reads of a request (:class:`consumer.webhook.RequestView`)."""

    __slots__ = ("headers", "remote")

    def __init__(self, headers: CIMultiDictProxy[str], remote: str | None) -> None:
        self.headers = headers
        self.remote = remote


class _Head:
    """The parser's callbacks for one head: its headers, as aiohttp decodes them."""

    __slots__ = ("fields", "max_field", "oversized")

    def __init__(self, max_field: int) -> None:
        self.fields: CIMultiDict[str] = CIMultiDict()
        self.max_field = max_field
        self.oversized = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) > self.max_field or len(value) > self.max_field:
            self.oversized = True
        self.fields.add(
            name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")
        )


class WebhookServer:
    """The listening socket's protocol factory (see the module docstring)."""

    def __init__(
        self, intake: Intake, aiohttp_server: web.Server, *, path: str, http: HttpSettings
    ) -> None:
        self.intake = intake
        self.aiohttp_server = aiohttp_server
        self.path = path.encode("ascii")
        self.keepalive_timeout_s = http.keepalive_timeout_s
        self.max_body = min(http.max_body_bytes, LARGE_BODY_BYTES)
        self.max_headers = http.max_headers
        self.max_field = http.max_header_bytes
        self.max_head = http.max_headers * (http.max_header_bytes + 2) + 8192
        self.connections: set[Connection] = set()
        self.answering = 0  # requests taken and not yet answered, on every connection
        self.closing = False  # shutting down: answers close their connection
        self._answered: asyncio.Future[None] | None = None  # shutdown waits on it
        self._date = b""
        self._date_at = 0
        self._answers: dict[tuple[object, ...], tuple[bytes, bytes]] = {}

    def __call__(self) -> Connection:
        return Connection(self)

    def answer_bytes(self, answer: Answer, keep_alive: bool) -> bytes:
        """The answer as written: its head and body are built once per distinct answer
        (what is written of it: an answer's ``error`` is logged, not sent)."""
        key = (
            answer.status,
            answer.outcome,
            answer.reason,
            answer.message,
            answer.retry_after,
            answer.close or not keep_alive,
        )
        parts = self._answers.get(key)
        if parts is None:
            if len(self._answers) >= _MAX_ANSWERS:
                self._answers.clear()
            parts = self._answers[key] = _answer_parts(answer, keep_alive)
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = b"Date: %s\r\n" % email.utils.formatdate(now, usegmt=True).encode()
        return b"".join((parts[0], self._date, parts[1]))

    async def shutdown(self, timeout_s: float) -> None:
        """Close idle connections, let requests being answered finish (bounded): their
        answers close their connections, and no pipelined request is taken after them."""
        self.closing = True
        for connection in list(self.connections):
            connection.close_if_idle()
        if self.answering:
            self._answered = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answered, timeout_s)
        for connection in list(self.connections):
            connection.abort()

    def taken(self) -> None:
        """A request is being answered."""
        self.answering += 1

    def answered(self) -> None:
        """A request was answered (its connection may be gone)."""
        self.answering -= 1
        if not self.answering and self._answered is not None and not self._answered.done():
            self._answered.set_result(None)


def _answer_parts(answer: Answer, keep_alive: bool) -> tuple[bytes, bytes]:
    body = json_body(answer.outcome, answer.reason, answer.message)
    reason = _REASONS.get(answer.status, b"Unknown")
    head = [
        b"HTTP/1.1 %d %s\r\n" % (answer.status, reason),
        b"Content-Type: application/json; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
    ]
    if answer.retry_after is not None:
        head.append(b"Retry-After: %s\r\n" % answer.retry_after.encode("ascii"))
    if answer.close or not keep_alive:
        head.append(b"Connection: close\r\n")
    return b"".join(head), _SERVER + b"\r\n" + body


class Connection(asyncio.Protocol):
    """One client connection, served here until it is handed to aiohttp."""

    def __init__(self, server: WebhookServer) -> None:
        self.server = server
        # Looked up once: on Python 3.11 each get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()
        self.answering = False  # a request was taken and is not answered yet
        self._keep_alive = True  # the request being answered's
        self._advancing = False  # in _advance: an answer given at once must not recurse
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._parser: Any = None
        self._remote: str | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0  # loop time the connection last became idle
        self._paused = False  # reading paused (see _flow)
        self._write_paused = False  # the transport's buffer is past its high-water mark
        self._closed = False
        self._scanned = 0  # bytes of the buffer already searched for the head's end

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) and peer else None
        self.server.connections.add(self)
        self._start_idle_timer()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self.answering:
            self._advance()
        self._flow()

    def pause_writing(self) -> None:
        """The client reads no more of our answers: take no request and read nothing
        until it does."""
        self._write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._flow()
        if self._buffer:
            self._advance()

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; an answer under way is dropped

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_idle_timer()
        self.server.connections.discard(self)

    # -- serving ------------------------------------------------------------------------

    def _flow(self) -> None:
        """Read while the unserved bytes fit one head and one body and the client takes
        our answers; pause reading otherwise."""
        transport = self._transport
        if transport is None or self._closed:
            return
        full = self._write_paused or len(self._buffer) > self.server.max_head + self.server.max_body
        if full != self._paused:
            self._paused = full
            if full:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _advance(self) -> None:
        """Serve the next whole request in the buffer, or hand the connection over."""
        if self.answering or self._closed or self._transport is None or self._write_paused:
            return  # answering one already; the connection is gone or handed over; or
            # the client does not read its answers (resume_writing comes back here)
        if self.server.closing:
            return  # shutting down: the connection closes after its answer under way
        server = self.server
        buffer = self._buffer
        # From where the last look ended: a head sent a byte at a time is scanned once.
        head_end = buffer.find(_HEAD_END, max(0, self._scanned - 3), server.max_head)
        if head_end < 0:
            self._scanned = len(buffer)
            if len(buffer) >= server.max_head:
                self._hand_over()  # aiohttp refuses the head
            return
        self._scanned = 0
        head_size = head_end + 4
        parsed = self._parse_head(bytes(buffer[:head_size]))
        if parsed is None:
            self._hand_over()
            return
        fields, length, keep_alive = parsed
        end = head_size + length
        if len(buffer) < end:
            # The body is still arriving: aiohttp's guarded way (its deadline, its caps).
            self._hand_over()
            return
        body = bytes(buffer[head_size:end])
        del buffer[:end]
        if self._paused:
            self._flow()
        try:
            self._parser.feed_data(body)  # completes the message: the parser's next one starts
        except httptools.HttpParserError:
            self._abort_request()
            return
        request = _Request(CIMultiDictProxy(fields), self._remote)
        self.answering, self._keep_alive, self._advancing = True, keep_alive, True
        server.taken()
        try:
            server.intake.receive_whole(request, body, self._respond)
        finally:
            self._advancing = False

    def _parse_head(self, head: bytes) -> tuple[CIMultiDict[str], int, bool] | None:
        """The head's headers, body length and keep-alive, when the request is the shape
        served here (see the module docstring); None otherwise."""
        server = self.server
        line_end = head.find(b"\r\n")
        parts = head[:line_end].split(b" ")
        if (
            line_end > MAX_LINE_BYTES
            or len(parts) != 3
            or parts[0] != b"POST"
            or parts[1].partition(b"?")[0] != server.path
            or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0")
            or head.count(b"\r\n") - 2 > server.max_headers
        ):
            return None
        callbacks = _Head(server.max_field)
        parser = httptools.HttpRequestParser(callbacks)
        try:
            parser.feed_data(head)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return None  # an upgrade (curl --http2 asks for h2c): aiohttp answers it
        fields = callbacks.fields
        lengths = fields.getall("Content-Length", ())
        if (
            callbacks.oversized
            or len(lengths) != 1
            or not lengths[0].isdigit()
            or "Transfer-Encoding" in fields
            or "Expect" in fields
            or "Upgrade" in fields
            or int(lengths[0]) > server.max_body
            or (len(fields.getall("Host", ())) != 1 and parts[2] == b"HTTP/1.1")
        ):
            return None  # (aiohttp answers 400 to an HTTP/1.1 request without one Host)
        length = int(lengths[0])
        if length == 0:
            return None  # the parser took the message as complete: aiohttp answers it
        self._parser = parser
        # HTTP/1.0 keeps a connection only when the answer says so, which these answers
        # never do: one that asks for keep-alive is answered "Connection: close".
        return fields, length, parser.should_keep_alive() and parts[2] == b"HTTP/1.1"

    def _respond(self, answer: Answer) -> None:
        """Write the answer (the intake calls this once per request), then serve the next
        request waiting, if any."""
        self.answering = False
        self.server.answered()
        transport = self._transport
        if self._closed or transport is None or transport.is_closing():
            return  # the client left: the event is stored all the same
        keep_alive = self._keep_alive and not self.server.closing
        transport.write(self.server.answer_bytes(answer, keep_alive))
        if answer.close or not keep_alive:
            transport.close()
            return
        self._start_idle_timer()
        if self._buffer:
            if self._advancing:  # answered at once: the next one in a later loop turn
                self._loop.call_soon(self._advance)
            else:
                self._advance()

    def _hand_over(self) -> None:
        """aiohttp serves this connection from the first byte not yet served on."""
        transport = self._transport
        if transport is None or self._closed or transport.is_closing():
            return
        self._cancel_idle_timer()
        self.server.connections.discard(self)
        data = bytes(self._buffer)
        self._buffer.clear()
        self._transport = None
        handler = self.server.aiohttp_server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._paused:
            transport.resume_reading()
        if data:
            handler.data_received(data)

    def _abort_request(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- timers and closing -----------------------------------------------------------

    def _start_idle_timer(self) -> None:
        """The connection is idle from now on. One timer per connection, moved on only
        when it fires: a call_later and a cancel per request cost 3% of the loop
        (``docs/performance.md``)."""
        loop = self._loop
        self._idle_since = loop.time()
        if self._idle_timer is None:
            timeout = self.server.keepalive_timeout_s
            self._idle_timer = loop.call_at(self._idle_since + timeout, self._idle_check)

    def _idle_check(self) -> None:
        """Close the connection if it stayed idle for the keep-alive timeout (a head not
        complete by then included); otherwise look again when it would have."""
        self._idle_timer = None
        if self._closed or self._transport is None:
            return
        loop = self._loop
        timeout = self.server.keepalive_timeout_s
        due = self._idle_since + timeout
        now = loop.time()
        if not self.answering and now >= due:
            if self._transport.get_write_buffer_size():
                self._transport.abort()  # the client stopped reading: close() would wait
            else:
                self._transport.close()
            return
        # Being answered (idle again once written), or idle for less than the timeout.
        self._idle_timer = loop.call_at(due if due > now else now + timeout, self._idle_check)

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def close_if_idle(self) -> None:
        """Close the connection unless a request is being answered."""
        if not self.answering and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.abort()
