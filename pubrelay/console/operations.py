"""The console's working pages: dead letters with replay, and the quarantine.

Replay goes through :func:`handlers.worker.replay.replay`, the code path of
``pubrelay replay``: first a dry run (``GET .../replay``, publishes and commits nothing)
that lists what would be sent, then the replay itself (``POST``, with the CSRF token the
middleware checks). The topics are read one at a time per console (``inspecting``): each
reading is a member of the topic's inspection group.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

from aiohttp import web

from consumer.quarantine import tail_quarantined
from handlers.worker.dead_letters import DeadLetter
from handlers.worker.replay import replay, scan_dead_letters
from pubrelay.console.app import CONSOLE, Console, read_form, render
from pubrelay.console.views import when

MAX_SHOWN: Final = 200
MAX_VIEWED_BYTES: Final = 64 * 1024
IDLE_TIMEOUT_S: Final = 0.2


def _handler(request: web.Request) -> tuple[Console, str]:
    console = request.app[CONSOLE]
    name = request.match_info["handler"]
    if name not in console.handlers:
        raise web.HTTPNotFound(text="no such handler")
    return console, name


def _failed_at(letter: DeadLetter) -> float | None:
    return letter.last_failed_at.timestamp() if letter.last_failed_at else None


def _filters(values: dict[str, str]) -> tuple[str | None, datetime | None]:
    """The replay's filters from a query or form: one event id, failed since a time."""
    event_id = values.get("event_id", "").strip()[:200] or None
    since_text = values.get("since", "").strip()
    try:
        since = datetime.fromisoformat(since_text) if since_text else None
    except ValueError:
        raise web.HTTPBadRequest(text="since: not an ISO 8601 time") from None
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return event_id, since


async def dead_letters(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    by_handler: dict[str, list[DeadLetter]] = {}
    totals: dict[str, int] = {}
    async with console.inspecting:
        for name in console.handlers:
            by_handler[name], totals[name] = await scan_dead_letters(
                console.bus,
                name,
                keep=MAX_SHOWN,
                read_limit=MAX_SHOWN + 1,  # one more tells "more than": the page reads 201
                topic_prefix=console.topic_prefix,
                group_prefix=console.group_prefix,
                timeout_s=console.read_timeout_s,
                idle_timeout_s=IDLE_TIMEOUT_S,
            )
    return render(
        request,
        "dead_letters.html",
        by_handler=by_handler,
        totals=totals,
        failed_at=_failed_at,
        when=when,
    )


async def replay_preview(request: web.Request) -> web.Response:
    """The dry run: what a replay with these filters would send."""
    console, name = _handler(request)
    event_id, since = _filters(dict(request.query))
    async with console.inspecting:
        summary = await replay(
            console.bus,
            name,
            topic_prefix=console.topic_prefix,
            group_prefix=console.group_prefix,
            event_id=event_id,
            since=since,
            dry_run=True,
            timeout_s=console.read_timeout_s,
            idle_timeout_s=IDLE_TIMEOUT_S,
        )
    return render(
        request,
        "replay.html",
        summary=summary,
        event_id=event_id or "",
        since=request.query.get("since", ""),
    )


async def replay_now(request: web.Request) -> web.Response:
    console, name = _handler(request)
    # A session's form was read, bounded, by the middleware; a Bearer call's is read here.
    form = await read_form(request)
    event_id, since = _filters({k: str(v) for k, v in form.items()})
    async with console.inspecting:
        summary = await replay(
            console.bus,
            name,
            topic_prefix=console.topic_prefix,
            group_prefix=console.group_prefix,
            event_id=event_id,
            since=since,
            timeout_s=console.read_timeout_s,
            idle_timeout_s=IDLE_TIMEOUT_S,
        )
    return render(request, "replay.html", summary=summary, event_id=event_id or "", since="")


async def quarantine(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    async with console.inspecting:
        records, total = await tail_quarantined(
            console.bus,
            topic_prefix=console.topic_prefix,
            group_prefix=console.group_prefix,
            keep=MAX_SHOWN,
            max_value_bytes=MAX_VIEWED_BYTES,
            timeout_s=console.read_timeout_s,
            idle_timeout_s=IDLE_TIMEOUT_S,
        )
    shown = [(r, r.message.value.decode("utf-8", "replace")) for r in records]
    return render(
        request, "quarantine.html", records=shown, total=total, max_bytes=MAX_VIEWED_BYTES
    )


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/dead-letters", dead_letters, name="dead_letters")
    replaying = router.add_resource("/dead-letters/{handler}/replay", name="replay")
    replaying.add_route("GET", replay_preview)
    replaying.add_route("POST", replay_now)
    router.add_get("/quarantine", quarantine, name="quarantine")
