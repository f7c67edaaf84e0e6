"""The console's reading pages: the overview, the search and one event's timeline.

Every value reaches the page through a Jinja2 template with autoescaping (``app.py``);
nothing here builds HTML. The bodies shown are verified but still free text.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry

from pubrelay.console.app import CONSOLE, render
from pubrelay.console.index import Counts, EventIndex
from pubrelay.console.mail import mails_for

MAX_QUERY_CHARS: Final = 320
HANDLER_OUTCOMES: Final = ("done", "skipped", "duplicate", "retrying", "dead_lettered")
CHART_BUCKETS: Final = 24
CHART_HEIGHT: Final = 80
NONE: Final = "\u2013"  # an en dash: no figure
_MAIL_OUTCOMES: Final = ("sent", "partial", "deferred", "rejected", "template_error")
_CRM_RESULTS: Final = ("ok", "partial", "rate_limited", "auth_failed", "client_error",
                       "server_error", "network_error")  # fmt: skip


def when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def pretty_body(body: bytes) -> str:
    """The body as indented JSON when it is JSON, else its text (invalid UTF-8 replaced)."""
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        return body.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Bar:
    x: int
    y: int
    height: int
    label: str


def bars(series: dict[str, list[int]], outcome: str) -> list[Bar]:
    """One bar per bucket of ``outcome``, scaled to the tallest bucket of any outcome."""
    values = series.get(outcome, [0] * CHART_BUCKETS)
    top = max([1, *(v for row in series.values() for v in row)])
    out = []
    for i, value in enumerate(values):
        height = round(CHART_HEIGHT * value / top)
        out.append(Bar(i * 12, CHART_HEIGHT - height, height, f"{value} {outcome}"))
    return out


def _sample(registry: CollectorRegistry | None, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels) if registry is not None else None


def _counted(
    registry: CollectorRegistry | None, name: str, label: str, values: tuple[str, ...]
) -> str:
    """``3 sent · 1 deferred`` from a counter of this process; empty when it has none."""
    found = [(v, _sample(registry, name, **{label: v})) for v in values]
    return (
        " · ".join(f"{n:g} {v}" for v, n in found if n)
        if any(n is not None for _, n in found)
        else ""
    )


def health(registry: CollectorRegistry | None) -> list[tuple[str, str, bool]]:
    """SMTP and the CRM as this process's metrics tell them: (what, text, ok)."""
    out = []
    mail = _counted(registry, "pubrelay_email_messages_total", "outcome", _MAIL_OUTCOMES)
    if mail or _sample(registry, "pubrelay_email_smtp_connections_total") is not None:
        rejected = _sample(registry, "pubrelay_email_messages_total", outcome="rejected") or 0
        out.append(("SMTP (since start)", mail or "no e-mail yet", not rejected))
    auth = _sample(registry, "pubrelay_crm_auth_failed")
    if auth is not None:
        crm = _counted(registry, "pubrelay_crm_requests_total", "result", _CRM_RESULTS)
        text = "HubSpot rejects the token" if auth else (crm or "no request yet")
        out.append(("CRM (since start)", text, not auth))
    return out


def worker_figures(registry: CollectorRegistry | None, handler: str) -> tuple[str, str]:
    """The handler's lag and the age of its oldest uncommitted record, when this process
    runs its worker (a dash otherwise)."""
    lag = _sample(registry, "pubrelay_consumer_lag", handler=handler)
    age = _sample(registry, "pubrelay_handler_oldest_uncommitted_age_seconds", handler=handler)
    return (f"{lag:g}" if lag is not None else NONE, f"{age:.0f} s" if age else NONE)


async def _bus_health(request: web.Request) -> str:
    try:
        async with asyncio.timeout(2.0):
            await request.app[CONSOLE].bus.ping()
    except Exception as err:  # any failure is what the page reports
        return f"unavailable ({type(err).__name__})"
    return "ok"


async def overview(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    now = time.time()
    hour = day = Counts({}, {}, {})
    series: dict[str, list[int]] = {}
    if console.index is not None:
        hour = await console.index.counts(now - 3600)
        day = await console.index.counts(now - 86400)
        series = await console.index.series(now - 86400, CHART_BUCKETS)
    handlers = sorted({*console.handlers, *day.handlers})
    return render(
        request,
        "overview.html",
        hour=hour,
        day=day,
        handlers=handlers,
        outcomes=HANDLER_OUTCOMES,
        accepted=bars(series, "accepted"),
        quarantined=bars(series, "quarantined"),
        oldest={h: round(now - t) for h, t in day.oldest_retrying.items()},
        worker={h: worker_figures(console.registry, h) for h in handlers},
        health=health(console.registry),
        bus=await _bus_health(request),
        dropped=console.recorder.dropped if console.recorder is not None else 0,
        indexed=console.index is not None,
        chart_height=CHART_HEIGHT,
        chart_width=CHART_BUCKETS * 12,
    )


def _index(request: web.Request) -> EventIndex:
    index = request.app[CONSOLE].index
    if index is None:
        raise web.HTTPServiceUnavailable(text="this process keeps no event index")
    return index


async def search(request: web.Request) -> web.Response:
    """``GET /console/events?q=``: by event, delivery or publication id, customer id or
    e-mail, or voucher code; the newest events when ``q`` is empty."""
    index = _index(request)
    query = request.query.get("q", "").strip()[:MAX_QUERY_CHARS]
    found = await (index.search(query) if query else index.recent())
    handlers = sorted({*request.app[CONSOLE].handlers, *(h for e in found for h in e.handlers)})
    return render(request, "events.html", q=query, events=found, handlers=handlers, when=when)


async def event_page(request: web.Request) -> web.Response:
    timeline = await _index(request).timeline(request.match_info["event_id"])
    if timeline is None:
        return render(request, "not_found.html", status=404)
    outbox = request.app[CONSOLE].outbox
    mails = await asyncio.to_thread(mails_for, outbox, timeline.event.event_id)
    return render(
        request,
        "event.html",
        t=timeline,
        body=pretty_body(timeline.event.body),
        when=when,
        mails=mails,
    )


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/", overview, name="overview")
    router.add_get("/events", search, name="events")
    router.add_get("/events/{event_id}", event_page, name="event")
