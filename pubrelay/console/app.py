"""The console's aiohttp application, mounted at ``/console/`` (``consumer/app.py``).

:func:`create_console_app` wires the pages (``views.py``, ``operations.py``) behind one
middleware that lets nothing through without the token (``auth.py``): a Bearer header or
a valid session cookie, and on every POST made with a cookie a valid CSRF token. Before
that check the only work is reading headers; the login form's body is read only when its
declared length is at most ``MAX_FORM_BYTES``, by at most ``MAX_LOGIN_READS`` requests at
once (429 past that), each within ``FORM_READ_TIMEOUT_S`` (408, and the connection
closed): a body that never arrives holds no connection, and the webhook serving on the
same port keeps its file descriptors. Every answer carries a strict
Content-Security-Policy (no script, no inline style, no frames but our own sandboxed
ones), ``nosniff``, ``no-referrer``, ``no-store`` and ``frame-ancestors 'none'``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import jinja2
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from bus.types import Bus
from pubrelay.console.auth import (
    COOKIE,
    COOKIE_PATH,
    FAILURE_DELAY_S,
    Gate,
    TooManyFailures,
    bearer,
    safe_next,
    session_id,
    set_session,
)
from pubrelay.console.index import EventIndex
from pubrelay.console.recorder import IndexRecorder

log = structlog.get_logger("pubrelay.console")

MAX_FORM_BYTES: Final = 16 * 1024
FORM_TYPE: Final = "application/x-www-form-urlencoded"
FORM_READ_TIMEOUT_S: Final = 5.0
"""A form's body (at most ``MAX_FORM_BYTES``) arrives within this, or the answer is 408."""
MAX_LOGIN_READS: Final = 16
"""Login forms being read at once, before any token is checked; past that, 429 at once."""
CSP: Final = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HERE: Final = Path(__file__).parent
_PUBLIC: Final = ("login", "static")
"""The only routes reachable without the token: the login form and the stylesheet."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def path_segment(value: object) -> str:
    """``value`` as one segment of a URL's path: every reserved character encoded, ``/``
    included (Jinja's ``urlencode`` keeps it), and ``.`` or ``..`` never left as such."""
    segment = quote(str(value), safe="")
    return segment.replace(".", "%2E") if segment in (".", "..") else segment


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,  # every value is escaped, in every template
        undefined=jinja2.StrictUndefined,
    )
    environment.filters["segment"] = path_segment
    return environment


@dataclass(slots=True)
class Console:
    """What the pages need; stored on the app under :data:`CONSOLE`."""

    gate: Gate
    bus: Bus
    index: EventIndex | None
    recorder: IndexRecorder | None
    handlers: Sequence[str]
    topic_prefix: str
    group_prefix: str
    templates: jinja2.Environment = field(default_factory=_environment)
    outbox: Path | None = None
    """Where the e-mail handler's outbox is (``SMTP_URL=outbox:``)."""
    registry: CollectorRegistry | None = None
    """This process's metrics: the worker's lag, SMTP and CRM figures (``views.py``)."""
    read_timeout_s: float = 3.0
    """How long a reading of a topic may wait for its partitions (a Kafka group join)."""
    inspecting: asyncio.Lock = field(default_factory=asyncio.Lock)
    """One reading of a dead-letter or quarantine topic at a time (one group member)."""
    form_read_timeout_s: float = FORM_READ_TIMEOUT_S
    login_reads: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(MAX_LOGIN_READS)
    )
    """Login forms being read (``MAX_LOGIN_READS``)."""


CONSOLE: Final = web.AppKey("console", Console)
SESSION: Final = web.RequestKey("session", str)
"""The request's session cookie, once the middleware found it valid."""


def render(
    request: web.Request, template: str, *, status: int = 200, **context: Any
) -> web.Response:
    """A page from ``templates/``, with the CSRF token of the request's session."""
    console = request.app[CONSOLE]
    session = request.get(SESSION)
    context.setdefault("csrf", console.gate.csrf_token(session) if session else "")
    context.setdefault("root", COOKIE_PATH)
    text = console.templates.get_template(template).render(**context)
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _wants_html(request: web.Request) -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("Accept", "")


@web.middleware
async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """401 (or, for a browser, the login page) unless the request carries the token."""
    route = request.match_info.route.name
    if route in _PUBLIC:
        return await handler(request)
    gate = request.app[CONSOLE].gate
    given = bearer(request)
    if given is not None:
        try:
            if await gate.check_token(given):
                return await handler(request)
        except TooManyFailures:
            raise web.HTTPTooManyRequests(text="too many failed attempts; retry later") from None
        raise web.HTTPUnauthorized(text="invalid token", headers={"WWW-Authenticate": "Bearer"})
    session = request.cookies.get(COOKIE, "")
    if not session or not gate.session_valid(session) or await _ended_elsewhere(request, session):
        if _wants_html(request):
            login = request.app.router["login"].url_for().with_query(next=request.path_qs)
            raise web.HTTPSeeOther(location=str(login))
        raise web.HTTPUnauthorized(text="log in or send Authorization: Bearer <token>")
    request[SESSION] = session
    if request.method not in ("GET", "HEAD"):
        form = await _small_form(request)
        if not gate.csrf_valid(session, str(form.get("csrf", ""))):
            raise web.HTTPForbidden(text="missing or invalid CSRF token; reload the page")
    return await handler(request)


async def _ended_elsewhere(request: web.Request, session: str) -> bool:
    """Whether another process logged this (valid) session out: the index every process
    of the deployment writes remembers logouts. Without the index, 503: a logged-out
    session must not come back while the index cannot tell."""
    index = request.app[CONSOLE].index
    if index is None:
        return False
    try:
        return await index.session_ended(session_id(session))
    except Exception as err:
        log.warning("console_session_check_failed", error_type=type(err).__name__)
        raise web.HTTPServiceUnavailable(text="the event index is unavailable") from None


async def _small_form(request: web.Request) -> Any:
    """The form, read only when it declares a small length, and only if it arrives in
    time (a connection that stops sending is closed)."""
    length = request.content_length
    if length is None or length > MAX_FORM_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_FORM_BYTES, actual_size=length or 0)
    if request.content_type != FORM_TYPE:  # multipart or text: no form this console sends
        raise web.HTTPUnsupportedMediaType(text=f"a form is sent as {FORM_TYPE}")
    try:
        async with asyncio.timeout(request.app[CONSOLE].form_read_timeout_s):
            return await read_form(request)
    except TimeoutError:
        late = web.HTTPRequestTimeout(text="the form did not arrive in time")
        late.force_close()  # after the answer, what still comes is read only while lingering
        raise late from None


async def read_form(request: web.Request) -> Any:
    """The request's form; 400 for a body or charset that is no form (``charset=bogus``,
    multipart without a boundary), which aiohttp raises as a ``ValueError`` or
    ``LookupError`` (an answer 500 before)."""
    try:
        return await request.post()
    except (ValueError, LookupError):
        raise web.HTTPBadRequest(text="the form could not be read") from None


async def _security_headers(_: web.Request, response: web.StreamResponse) -> None:
    """The console's headers; a page that sets its own policy (an outbox e-mail's HTML,
    framed by the console) keeps it."""
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-store"


async def login_page(request: web.Request) -> web.Response:
    return render(request, "login.html", next=safe_next(request.query.get("next")), failed=False)


async def login(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    if console.login_reads.locked():
        raise web.HTTPTooManyRequests(text="too many logins under way; retry later")
    async with console.login_reads:
        form = await _small_form(request)
    target = safe_next(str(form.get("next", "")))
    try:
        ok = await console.gate.check_token(str(form.get("token", "")))
    except TooManyFailures:
        return render(request, "login.html", next=target, failed=True, status=429)
    if not ok:
        return render(request, "login.html", next=target, failed=True, status=401)
    response = web.Response(status=303, headers={"Location": target})
    set_session(response, request, console.gate.new_session(), console.gate.session_ttl_s)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    if session := request.get(SESSION):  # valid: the middleware checked (none with Bearer)
        ended, expiry = console.gate.end_session(session)
        if console.index is not None:  # for the other processes
            try:
                await console.index.end_session(ended, expiry)
            except Exception as err:  # this process refuses it; say the others may not
                log.warning("console_logout_not_shared", error_type=type(err).__name__)
    response = web.Response(
        status=303, headers={"Location": str(request.app.router["login"].url_for())}
    )
    response.del_cookie(COOKIE, path=COOKIE_PATH)
    return response


def create_console_app(
    *,
    token: str,
    session_ttl_s: float,
    bus: Bus,
    index: EventIndex | None,
    recorder: IndexRecorder | None,
    handlers: Sequence[str],
    topic_prefix: str,
    group_prefix: str,
    failure_delay_s: float = FAILURE_DELAY_S,
    outbox: Path | None = None,
    registry: CollectorRegistry | None = None,
    read_timeout_s: float = 3.0,
    form_read_timeout_s: float = FORM_READ_TIMEOUT_S,
) -> web.Application:
    """The console: mount it with ``app.add_subapp("/console/", ...)``."""
    from pubrelay.console import mail, operations, views  # noqa: PLC0415 - the pages load with it

    app = web.Application(middlewares=[require_token])
    app[CONSOLE] = Console(
        gate=Gate(token, session_ttl_s=session_ttl_s, failure_delay_s=failure_delay_s),
        bus=bus,
        index=index,
        recorder=recorder,
        handlers=handlers,
        topic_prefix=topic_prefix,
        group_prefix=group_prefix,
        outbox=outbox,
        registry=registry,
        read_timeout_s=read_timeout_s,
        form_read_timeout_s=form_read_timeout_s,
    )
    app.on_response_prepare.append(_security_headers)
    sign_in = app.router.add_resource("/login", name="login")
    sign_in.add_route("GET", login_page)
    sign_in.add_route("POST", login)
    app.router.add_post("/logout", logout)
    app.router.add_static("/static/", _HERE / "static", name="static")
    views.add_routes(app.router)
    operations.add_routes(app.router)
    mail.add_routes(app.router)
    return app
