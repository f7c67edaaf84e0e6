"""The webhook consumer: an aiohttp application.

``POST /webhooks/voucherify``: verify the signature over the raw body (before any JSON is
parsed), classify the body, publish it, and answer 202 only once the bus acknowledged it.
``GET /healthz`` (process alive), ``GET /readyz`` (bus reachable), ``GET /metrics``.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from ipaddress import IPv6Address, ip_address
from typing import Final

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from bus.types import Bus
from consumer.config import HttpSettings, WebhookSettings
from consumer.metrics import WebhookMetrics
from consumer.routing import Quarantined, Routed, classify
from consumer.signature import Verifier
from schemas.errors import BusError, BusUnavailable, TopicMissing
from schemas.record import (
    HEADER_CONTENT_TYPE,
    HEADER_DELIVERY_ID,
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_QUARANTINE_REASON,
    HEADER_RECEIVED_AT,
    HEADER_SIGNATURE,
    Headers,
)
from schemas.timestamps import utc_now_iso
from schemas.topics import quarantine_topic, topic_for

log = structlog.get_logger("pubrelay.consumer")


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
        metrics: WebhookMetrics,
    ) -> None:
        self.bus = bus
        self.settings = webhook
        self.verifier = verifier
        self.topic_prefix = topic_prefix
        self.quarantine_topic = quarantine_topic(topic_prefix)
        self.publish_timeout_s = publish_timeout_s
        self.metrics = metrics
        self.allowed = tuple(webhook.allowed_networks)
        self.retry_after = str(webhook.retry_after_s)

    def _client_allowed(self, request: web.Request) -> bool:
        if not self.allowed:
            return True
        remote = request.remote
        if self.settings.trust_forwarded_for:
            forwarded = request.headers.get("X-Forwarded-For")
            if forwarded:
                # The rightmost entry is the one our proxy added; everything left of it
                # is whatever the client chose to send.
                remote = forwarded.rsplit(",", 1)[-1].strip()
        try:
            address = ip_address(remote or "")
        except ValueError:
            return False
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener sees ::ffff:a.b.c.d
        return any(address in network for network in self.allowed)

    async def receive(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        given_id = request.headers.get("X-Request-Id", "")
        fields: dict[str, object] = {
            "request_id": given_id if _REQUEST_ID.fullmatch(given_id) else uuid.uuid4().hex,
        }
        try:
            response = await self._receive(request, fields)
        except Exception:  # a bug must still answer, count and log
            log.exception("webhook_request_failed", **fields)
            fields["outcome"] = "error"
            response = _json(500, "error", "internal error; the event was not accepted")
        outcome = str(fields["outcome"])
        elapsed = time.perf_counter() - started
        self.metrics.requests.labels(outcome).inc()
        self.metrics.request_seconds.labels(outcome).observe(elapsed)
        emit = log.info if response.status < 500 else log.warning
        emit(
            "webhook_request",
            status=response.status,
            latency_ms=round(elapsed * 1000, 2),
            **fields,
        )
        return response

    async def _receive(self, request: web.Request, fields: dict[str, object]) -> web.Response:
        if not self._client_allowed(request):
            fields["outcome"] = "forbidden"
            return _json(403, "forbidden", "source address is not in the allowlist")
        limit = request.app[HTTP_SETTINGS].max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            fields["outcome"] = "too_large"
            return _json(413, "too_large", f"body is over the {limit}-byte limit")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            fields["outcome"] = "too_large"
            return _json(413, "too_large", f"body is over the {limit}-byte limit")
        except (ConnectionError, ValueError) as err:
            fields["outcome"] = "bad_request"
            return _json(400, "bad_request", f"could not read the body: {err}")

        signature = request.headers.get(HEADER_SIGNATURE)
        if not self.settings.allow_unsigned and not self.verifier.verify(body, signature):
            fields["outcome"] = "unauthorized"
            fields["signature_present"] = signature is not None
            return _json(401, "unauthorized", "missing or invalid x-voucherify-signature")

        decision = classify(
            body,
            max_depth=self.settings.max_json_depth,
            max_event_age_s=self.settings.max_event_age_s,
        )
        received_at = utc_now_iso().encode()
        headers: Headers
        if isinstance(decision, Routed):
            topic = topic_for(self.topic_prefix, decision.event_type)
            key: bytes | None = decision.key.encode()
            headers = (
                (HEADER_EVENT_ID, decision.event_id.encode()),
                (HEADER_EVENT_TYPE, decision.event_type.encode()),
                (HEADER_DELIVERY_ID, decision.delivery_id.encode()),
                (HEADER_RECEIVED_AT, received_at),
                (HEADER_SIGNATURE, _raw_header(request, HEADER_SIGNATURE)),
            )
            fields.update(
                delivery_id=decision.delivery_id,
                event_id=decision.event_id,
                event_type=decision.event_type,
            )
        else:
            topic, key, headers = self._quarantine_record(decision, request, received_at)
            fields.update(
                reason=decision.reason,
                detail=decision.detail,
                delivery_id=decision.delivery_id,
                event_id=decision.event_id,
            )
        del decision  # keep nothing large alive across the await (perf-notes)

        published = time.perf_counter()
        try:
            await self.bus.publish(
                topic, body, key=key, headers=headers, timeout_s=self.publish_timeout_s
            )
        except TopicMissing as err:
            if topic == self.quarantine_topic:
                return self._unavailable(fields, err)
            # The event's topic cannot be created (no permission, auto-create off): keep the
            # event in quarantine rather than answer 503 until Voucherify gives up on us.
            no_topic = Quarantined(
                "no_topic",
                str(err),
                delivery_id=str(fields.get("delivery_id") or "") or None,
                event_id=str(fields.get("event_id") or "") or None,
                event_type=str(fields.get("event_type") or "") or None,
            )
            topic, key, headers = self._quarantine_record(no_topic, request, received_at)
            fields.update(reason=no_topic.reason, detail=no_topic.detail)
            try:
                await self.bus.publish(
                    topic, body, key=key, headers=headers, timeout_s=self.publish_timeout_s
                )
            except BusError as again:
                return self._unavailable(fields, again)
        except BusUnavailable as err:
            return self._unavailable(fields, err)
        self.metrics.publish_seconds.observe(time.perf_counter() - published)

        if topic == self.quarantine_topic:
            self.metrics.quarantined.labels(str(fields["reason"])).inc()
            fields["outcome"] = "quarantined"
            return _json(202, "quarantined", "kept on the quarantine topic")
        fields["outcome"] = "accepted"
        return _json(202, "accepted")

    def _unavailable(self, fields: dict[str, object], err: BusError) -> web.Response:
        """503 + Retry-After: nothing was stored, Voucherify will deliver again."""
        self.metrics.bus_errors.labels("publish").inc()
        fields["outcome"] = "unavailable"
        fields["error"] = str(err)
        response = _json(503, "unavailable", "the event store is unavailable; retry later")
        response.headers["Retry-After"] = self.retry_after
        return response

    def _quarantine_record(
        self, decision: Quarantined, request: web.Request, received_at: bytes
    ) -> tuple[str, bytes | None, Headers]:
        headers: list[tuple[str, bytes]] = [
            (HEADER_QUARANTINE_REASON, decision.reason.encode()),
            ("quarantine-detail", decision.detail.encode()),
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
        return self.quarantine_topic, key, tuple(headers)

    async def ready(self, _: web.Request) -> web.Response:
        try:
            await self.bus.ping()
        except BusUnavailable as err:
            self.metrics.bus_errors.labels("ping").inc()
            log.warning("readiness_failed", error=str(err))
            return _json(503, "unavailable", "the event store does not answer")
        return _json(200, "ready")


_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _raw_header(request: web.Request, name: str) -> bytes:
    """A header's value as the bytes received (aiohttp decodes them as UTF-8 with
    surrogate escapes; encoding back the same way cannot fail)."""
    return request.headers.get(name, "").encode("utf-8", "surrogateescape")


def _json(status: int, state: str, message: str | None = None) -> web.Response:
    body = {"status": state} if message is None else {"status": state, "message": message}
    return web.json_response(body, status=status)


async def healthz(_: web.Request) -> web.Response:
    return _json(200, "ok")


INTAKE = web.AppKey("intake", Intake)
HTTP_SETTINGS = web.AppKey("http_settings", HttpSettings)


def create_app(
    *,
    bus: Bus,
    http: HttpSettings,
    webhook: WebhookSettings,
    secrets: Sequence[str],
    topic_prefix: str,
    publish_timeout_s: float,
    registry: CollectorRegistry,
    manage_bus: bool = True,
) -> web.Application:
    """Build the consumer application.

    With ``manage_bus`` the application starts the bus on start-up and closes it on
    clean-up; otherwise the caller owns the bus's lifecycle (``pubrelay serve`` shares it
    with the worker).
    """
    intake = Intake(
        bus=bus,
        webhook=webhook,
        verifier=Verifier(secrets),
        topic_prefix=topic_prefix,
        publish_timeout_s=publish_timeout_s,
        metrics=WebhookMetrics(registry),
    )
    app = web.Application(client_max_size=http.max_body_bytes)
    app[INTAKE] = intake
    app[HTTP_SETTINGS] = http
    if manage_bus:

        async def bus_context(_: web.Application) -> AsyncIterator[None]:
            await bus.start()
            try:
                yield
            finally:
                await bus.close()

        app.cleanup_ctx.append(bus_context)
    app.router.add_post(webhook.path, intake.receive)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", intake.ready)
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    return app
