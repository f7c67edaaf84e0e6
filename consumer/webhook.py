"""The webhook request, step by step (``POST /webhooks/voucherify``).

Check the source address, read the body within the limit, verify the signature over the
raw bytes (before any JSON is parsed), classify the body, build its record (routed to the
event's topic, or quarantined with a reason), publish it, and answer: 202 only once the
bus acknowledged the record, 503 with ``Retry-After`` when it did not. Every request is
counted and logged once, at the end, as one ``webhook_request`` line.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import structlog
from aiohttp import web
from multidict import CIMultiDictProxy

from bus.types import Bus, Submit, submitter
from consumer.answers import (
    ACCEPTED,
    FORBIDDEN,
    INTERNAL_ERROR,
    NOT_NORMALISED,
    Answer,
    quarantined,
    too_large_for_bus,
)
from consumer.body import BodyReader, BodyRefused
from consumer.config import WebhookSettings
from consumer.metrics import WebhookMetrics
from consumer.observer import IntakeObserver
from consumer.routing import Quarantined, Routed, classify, routed_headers
from consumer.signature import Verdict, Verifier
from consumer.source import Source, SourceCheck, client_fields
from schemas.errors import BusError, BusUnavailable, RecordTooLarge, TopicMissing
from schemas.frozen import frozen
from schemas.record import (
    HEADER_CONTENT_TYPE,
    HEADER_DELIVERY_ID,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_QUARANTINE_DETAIL,
    HEADER_QUARANTINE_REASON,
    HEADER_RECEIVED_AT,
    HEADER_SIGNATURE,
    Headers,
)
from schemas.timestamps import utc_now_iso
from schemas.topics import quarantine_topic, topic_for

log = structlog.get_logger("pubrelay.consumer")

WriteLine = Callable[[str, str, dict[str, object]], bool]
"""Writes a request's line (level name, event, fields) without structlog's calls; False
when the line must go through structlog (``pubrelay/logging.py``'s ``log_line``)."""

_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@frozen
class Record:
    """What a request publishes: to the event's topic, or to quarantine with a reason.

    ``routed`` is set when the event's topic was known, also when it fell back to
    quarantine because that topic may not be created; ``quarantined`` is set when the
    record goes to the quarantine topic.
    """

    topic: str
    key: bytes | None
    headers: Headers
    received_at: bytes
    routed: Routed | None = None
    quarantined: Quarantined | None = None

    def log_fields(self) -> dict[str, object]:
        """The event's part of the log line: its ids, and why it was quarantined."""
        fields: dict[str, object] = {}
        if self.routed is not None:
            fields.update(
                delivery_id=self.routed.delivery_id,
                event_id=self.routed.event_id,
                event_type=self.routed.event_type,
            )
        if self.quarantined is not None:
            fields.update(reason=self.quarantined.reason, detail=self.quarantined.detail)
            if self.routed is None:
                fields.update(
                    delivery_id=self.quarantined.delivery_id,
                    event_id=self.quarantined.event_id,
                )
        return fields


@dataclass(slots=True)
class RequestLine:
    """The request's one ``webhook_request`` log line: its id, the record once built
    (replaced when the event falls back to quarantine), then the answer's fields."""

    request_id: str
    record: Record | None = None
    body: bytes = b""

    def fields(
        self, answer: Answer | None = None, *, into: dict[str, object] | None = None
    ) -> dict[str, object]:
        """The line's fields (added to ``into``, when given)."""
        fields: dict[str, object] = {} if into is None else into
        fields["request_id"] = self.request_id
        if self.record is not None:
            fields.update(self.record.log_fields())
        if answer is not None:
            fields.update(answer.log_fields())
        return fields


class _InFlight:
    """A request from its publish to its answer: what the bus's callback needs."""

    __slots__ = ("intake", "line", "published", "respond", "retried", "started", "view")

    def __init__(
        self,
        intake: Intake,
        view: RequestView,
        line: RequestLine,
        respond: Callable[[Answer], object],
        started: float,
    ) -> None:
        self.intake = intake
        self.view = view
        self.line = line
        self.respond = respond
        self.started = started
        self.published = 0.0  # time.perf_counter() when the publish started
        self.retried = False  # published to quarantine after its topic was missing

    def finish(self, answer: Answer) -> None:
        """Count and log the request once, then answer it (whatever the counting raised)."""
        try:
            self.intake._done(self.view, self.line, answer, self.started)
        finally:
            self.respond(answer)

    def sent(self, future: asyncio.Future[None]) -> None:
        """The bus answered the publish (a done callback of its future)."""
        try:
            error = (
                BusUnavailable("the publish was cancelled")
                if future.cancelled()
                else future.exception()
            )
            answer = self.intake._after_send(self, error)
        except Exception:  # a bug must still answer, count and log
            log.exception("webhook_request_failed", **self.line.fields())
            answer = INTERNAL_ERROR
        if answer is not None:
            self.finish(answer)


def _settle_with(future: asyncio.Future[Answer]) -> Callable[[Answer], None]:
    """A ``respond`` that settles ``future`` (left alone once it was cancelled)."""

    def respond(answer: Answer) -> None:
        if not future.done():
            future.set_result(answer)

    return respond


class RequestView(Protocol):
    """What the intake reads of a request: aiohttp's, or the webhook's own HTTP layer's."""

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def remote(self) -> str | None: ...


class Intake:
    """The webhook endpoint and its dependencies (one per application)."""

    def __init__(
        self,
        *,
        bus: Bus,
        webhook: WebhookSettings,
        verifier: Verifier,
        topic_prefix: str,
        publish_timeout_s: float,
        max_body_bytes: int,
        metrics: WebhookMetrics,
        body_read_timeout_s: float,
        max_concurrent_bodies: int,
        max_concurrent_large_bodies: int,
        observer: IntakeObserver | None = None,
        write_line: WriteLine | None = None,
    ) -> None:
        self.bus = bus
        self._submit: Submit = submitter(bus)
        self.observer = observer
        self.write_line = write_line
        self.settings = webhook
        self.verifier = verifier
        self.topic_prefix = topic_prefix
        self.quarantine_topic = quarantine_topic(topic_prefix)
        self.publish_timeout_s = publish_timeout_s
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        self.source = SourceCheck(
            webhook.allowed_networks,
            trust_forwarded_for=webhook.trust_forwarded_for,
            trusted_proxy_hops=webhook.trusted_proxy_hops,
        )
        self.bad_forwarded_for = Answer(
            403,
            "forbidden",
            FORBIDDEN.message,
            error=f"X-Forwarded-For holds fewer than {webhook.trusted_proxy_hops} entries "
            "(TRUSTED_PROXY_HOPS), or no address there",
        )
        self.retry_after = str(webhook.retry_after_s)
        self.too_large = Answer(413, "too_large", f"body is over the {max_body_bytes}-byte limit")
        self.body_reader = BodyReader(
            max_bytes=max_body_bytes,
            timeout_s=body_read_timeout_s,
            max_bodies=max_concurrent_bodies,
            max_large_bodies=max_concurrent_large_bodies,
        )
        reader = self.body_reader
        metrics.bodies_receiving.labels("any").set_function(lambda: reader.reading)
        metrics.bodies_receiving.labels("large").set_function(lambda: reader.reading_large)

    async def receive(self, request: web.Request) -> web.Response:
        """The aiohttp handler: read the body, then as :meth:`receive_whole`."""
        started = time.perf_counter()
        line = RequestLine(_request_id(request))
        try:
            read = self._check_source(request) or await self._read_body(request)
        except Exception:  # a bug must still answer, count and log
            log.exception("webhook_request_failed", **line.fields())
            read = INTERNAL_ERROR
        if isinstance(read, Answer):
            self._done(request, line, read, started)
            return read.response()
        answered: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._answer_body(request, read, line, _settle_with(answered), started)
        # A handler cancelled meanwhile cancels only this wait: the publish goes on, and the
        # request is counted and logged when it ends.
        return (await answered).response()

    def receive_whole(
        self, request: RequestView, body: bytes, respond: Callable[[Answer], object]
    ) -> None:
        """The same for a request whose body was received whole by the webhook's own HTTP
        layer (:mod:`consumer.http1`): ``respond`` is called with the answer once, maybe
        before this returns, and writes it.

        No task and no coroutine per request: the steps before the publish run here, the
        rest in the callback of the bus's future (docs/performance.md, "The request without
        a task")."""
        started = time.perf_counter()
        line = RequestLine(_request_id(request))
        try:
            refused = self._check_source(request)
        except Exception:  # a bug must still answer, count and log
            log.exception("webhook_request_failed", **line.fields())
            refused = INTERNAL_ERROR
        if refused is None:
            self._answer_body(request, body, line, respond, started)
        else:
            _InFlight(self, request, line, respond, started).finish(refused)

    def _done(
        self, request: RequestView, line: RequestLine, answer: Answer, started: float
    ) -> None:
        """Count and log the request once, and tell the observer."""
        elapsed_s = time.perf_counter() - started
        self.metrics.count_request(answer.outcome, elapsed_s)
        level = "info" if answer.status < 500 else "warning"
        fields = line.fields(
            answer, into={"status": answer.status, "latency_ms": round(elapsed_s * 1000, 2)}
        )
        if answer.status in (401, 403):  # the runbook reads who was refused from here
            forwarded = request.headers.getall("X-Forwarded-For", ())
            fields.update(client_fields(request.remote, forwarded))
        write_line = self.write_line
        if write_line is None or not write_line(level, "webhook_request", fields):
            getattr(log, level)("webhook_request", **fields)
        if self.observer is not None and (record := line.record) is not None:
            self.observer.received(
                topic=record.topic,
                headers=record.headers,
                body=line.body,
                status=answer.status,
                outcome=answer.outcome,
            )

    def _answer_body(
        self,
        request: RequestView,
        body: bytes,
        line: RequestLine,
        respond: Callable[[Answer], object],
        started: float,
    ) -> None:
        """The steps after the body was read: the signature, the record, its publish."""
        flight = _InFlight(self, request, line, respond, started)
        sent: asyncio.Future[None] | None = None
        try:
            refused = self._check_signature(request, body)
            if refused is None:
                # classify() drops the decoded envelope before it returns: what stays alive
                # across the publish is the record, bytes and a few short strings
                # (docs/performance.md).
                record = self._build_record(request, body)
                flight.line.record, flight.line.body = record, body
                flight.published = time.perf_counter()
                sent = self._send(record, body)
        except Exception:  # a bug must still answer, count and log
            log.exception("webhook_request_failed", **flight.line.fields())
            refused = INTERNAL_ERROR
        if sent is None:
            assert refused is not None
            flight.finish(refused)  # outside the try: the request is answered once
        else:
            sent.add_done_callback(flight.sent)

    def _check_source(self, request: RequestView) -> Answer | None:
        """403 unless the client's address is in the allowlist (when one is set)."""
        if not self.source.enabled:
            return None
        # Every line of the header: a proxy may append a line of its own (consumer/source.py).
        forwarded = request.headers.getall("X-Forwarded-For", ())
        verdict = self.source.check(request.remote, forwarded)
        if verdict is Source.ALLOWED:
            return None
        if verdict is Source.BAD_FORWARDED_FOR:
            self.metrics.refused.labels("forwarded_for").inc()
            return self.bad_forwarded_for
        return FORBIDDEN

    async def _read_body(self, request: web.Request) -> bytes | Answer:
        """The raw body; 413 over the limit (before reading when the length is declared),
        408 when it does not arrive in time, 503 when too many are being received
        (``consumer/body.py``)."""
        body = await self.body_reader.read(request)
        if not isinstance(body, BodyRefused):
            return body
        if body.guard is not None:
            self.metrics.refused.labels(body.guard).inc()
        if body.outcome == "too_large":
            return self.too_large
        if body.outcome == "body_timeout":
            return Answer(408, "body_timeout", body.detail, close=True)
        if body.outcome == "busy":
            return Answer(
                503,
                "busy",
                f"{body.detail}; retry later",
                retry_after=self.retry_after,
                close=True,
            )
        return Answer(400, "bad_request", body.detail)

    def _check_signature(self, request: RequestView, body: bytes) -> Answer | None:
        """401 unless the body carries a valid signature (or unsigned requests are allowed)."""
        if self.settings.allow_unsigned:
            return None
        signature = request.headers.get(HEADER_SIGNATURE)
        verdict = self.verifier.check(body, signature)
        if verdict is Verdict.VALID:
            return None
        if signature is not None:
            self.metrics.refused.labels("signature_mismatch").inc()
        if verdict is Verdict.NOT_NORMALISED:
            self.metrics.refused.labels("signature_fallback_skipped").inc()
        return Answer(
            401,
            "unauthorized",
            "missing or invalid x-voucherify-signature",
            signature_present=signature is not None,
            error=NOT_NORMALISED if verdict is Verdict.NOT_NORMALISED else None,
        )

    def _build_record(self, request: RequestView, body: bytes) -> Record:
        """Classify the verified body and build its record: routed, or quarantined."""
        decision = classify(
            body,
            max_depth=self.settings.max_json_depth,
            max_event_age_s=self.settings.max_event_age_s,
        )
        received_at = utc_now_iso().encode()
        if isinstance(decision, Quarantined):
            return self._quarantine_record(decision, request, received_at)
        headers = routed_headers(
            decision,
            received_at=received_at,
            signature=_raw_header(request, HEADER_SIGNATURE),
        )
        topic = topic_for(self.topic_prefix, decision.event_type)
        return Record(topic, decision.key.encode(), headers, received_at, routed=decision)

    def _quarantine_record(
        self,
        decision: Quarantined,
        request: RequestView,
        received_at: bytes,
        routed: Routed | None = None,
    ) -> Record:
        """A record for the quarantine topic: the reason, and whatever ids are known."""
        headers: list[tuple[str, bytes]] = [
            (HEADER_QUARANTINE_REASON, decision.reason.encode()),
            (HEADER_QUARANTINE_DETAIL, decision.detail.encode()),
            (HEADER_RECEIVED_AT, received_at),
            (HEADER_CONTENT_TYPE, _raw_header(request, "Content-Type")),
            (HEADER_SIGNATURE, _raw_header(request, HEADER_SIGNATURE)),
        ]
        for name, value in (
            (HEADER_DELIVERY_ID, decision.delivery_id),
            (HEADER_EVENT_ID, decision.event_id),
            (HEADER_EVENT_TYPE, decision.event_type),
        ):
            if value:
                headers.append((name, value.encode()))
        key = decision.event_id.encode() if decision.event_id else None
        return Record(
            self.quarantine_topic,
            key,
            tuple(headers),
            received_at,
            routed=routed,
            quarantined=decision,
        )

    def _after_send(self, flight: _InFlight, error: BaseException | None) -> Answer | None:
        """The answer once the bus answered the publish: 202 once it acknowledged the
        record, 503 when it did not, 413 when it refuses it for its size (it always will:
        no retry can help). None when the record goes to quarantine instead: an event
        whose topic may not be created is kept there (and the log line says so)."""
        record = flight.line.record
        assert record is not None
        # Every publish's time, refused and timed out ones too: the slow ones are those.
        self.metrics.publish_seconds.observe(time.perf_counter() - flight.published)
        if error is None:
            if record.quarantined is not None:
                self.metrics.quarantined.labels(record.quarantined.reason).inc()
                return quarantined(record.quarantined.reason)
            return ACCEPTED
        if isinstance(error, RecordTooLarge):
            return too_large_for_bus(error)
        if isinstance(error, TopicMissing) and record.routed is not None and not flight.retried:
            # The event's topic cannot be created (no permission, auto-create off): keep the
            # event in quarantine rather than answer 503 until Voucherify gives up on us.
            record = self._no_topic_record(record.routed, error, flight.view, record.received_at)
            flight.line.record, flight.retried = record, True
            flight.published = time.perf_counter()
            self._send(record, flight.line.body).add_done_callback(flight.sent)
            return None
        if isinstance(error, BusError):
            return self._unavailable(error)
        raise error

    def _no_topic_record(
        self, routed: Routed, err: TopicMissing, request: RequestView, received_at: bytes
    ) -> Record:
        """The quarantine record of an event whose topic may not be created."""
        no_topic = Quarantined(
            "no_topic",
            str(err),
            delivery_id=routed.delivery_id or None,
            event_id=routed.event_id or None,
            event_type=routed.event_type or None,
        )
        return self._quarantine_record(no_topic, request, received_at, routed=routed)

    def _send(self, record: Record, body: bytes) -> asyncio.Future[None]:
        """Publish the record; the future is settled once the bus answered."""
        return self._submit(
            record.topic,
            body,
            key=record.key,
            headers=record.headers,
            timeout_s=self.publish_timeout_s,
        )

    def _unavailable(self, err: BusError) -> Answer:
        """503 + Retry-After: nothing was stored, Voucherify will deliver again."""
        self.metrics.bus_errors.labels("publish").inc()
        return Answer(
            503,
            "unavailable",
            "the event store is unavailable; retry later",
            retry_after=self.retry_after,
            error=str(err),
        )


# New request ids: random per process, then counted (a random id per request cost a
# getrandom() system call each: docs/performance.md). Unique, not secret.
_ID_PREFIX: Final = os.urandom(8).hex()
_next_id = itertools.count(1).__next__


def _request_id(request: RequestView) -> str:
    """The caller's ``X-Request-Id`` when it is a sane token, otherwise a new one."""
    given = request.headers.get("X-Request-Id", "")
    return given if given and _REQUEST_ID.fullmatch(given) else f"{_ID_PREFIX}{_next_id():016x}"


def _raw_header(request: RequestView, name: str) -> bytes:
    """A header's value as the bytes received (aiohttp decodes them as UTF-8 with
    surrogate escapes; encoding back the same way cannot fail)."""
    return request.headers.get(name, "").encode("utf-8", "surrogateescape")
