"""The handler contract: what a plugin implements and what the worker gives it.

A plugin is a package with an entry point in group ``pubrelay.handlers`` naming a
factory ``create(context: HandlerContext) -> Handler``. The worker runs each enabled
handler in its own consumer group, calls :meth:`Handler.handle` once per event (retrying
on transient errors), and records the events whose effect completed in a ledger, so a
handler is never called again for an event it already handled.

What ``handle`` may raise, and what the worker then does:

* returns normally: the effect is done; the ledger records ``(handler, event id)``.
* :class:`schemas.errors.SkipEvent`: not acting on this event; recorded as done, counted.
* :class:`schemas.errors.RetryLater` (optionally with ``delay_s``), any exception whose
  class has ``retriable = True``, ``OSError`` or ``TimeoutError``: retried with exponential
  back-off; later events of the same customer wait (order), other customers do not.
  ``RetryLater(keep_order=False)`` lets the customer's later events run meanwhile (for a
  handler waiting for one of them); the event is still retried and counts its attempts.
* anything else (:class:`schemas.errors.HandlerError`, a pydantic ``ValidationError`` from
  :attr:`Event.envelope`, a bug): the event goes to the dead-letter topic
  ``<prefix>dlq.<handler>`` at once. Retries exhausted end there too.

Each attempt runs under the worker's claim on ``(handler, event id)`` in the shared
ledger, so no two workers run one event's effect at the same time. Effects should still be
idempotent where the target allows it (natural keys such as the event id): the ledger is
written after the effect, so a crash between the two repeats that one effect once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel
from structlog.typing import FilteringBoundLogger

from handlers.config import handler_name_problem, load_section, section_env_prefix
from schemas.errors import ConfigError
from schemas.frozen import frozen
from schemas.record import HEADER_DELIVERY_ID, Headers, header_text

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from schemas.events import WebhookEnvelope

ENTRY_POINT_GROUP: Final = "pubrelay.handlers"

Outcome = Literal["handled", "retried", "dead_lettered", "skipped", "duplicate", "ignored"]
OUTCOMES: Final[tuple[Outcome, ...]] = (
    "handled",
    "retried",
    "dead_lettered",
    "skipped",
    "duplicate",
    "ignored",
)


def check_handler_name(name: str) -> str:
    """Handler names end up in topic, group, metric-label and env-var names: keep them plain."""
    problem = handler_name_problem(name)
    if problem:
        raise ConfigError(problem)
    return name


class Event:
    """One event as a handler receives it.

    ``raw`` is the webhook body exactly as received (re-verifiable), ``envelope`` the full
    typed model, parsed on first access (a handler that needs only ids or the raw bytes
    does not pay for the parse). A body the model rejects raises pydantic's
    ``ValidationError`` from ``envelope``; the worker dead-letters it without retrying.
    ``attempt`` starts at 1 and grows with each attempt, counted in the ledger across
    deliveries (a restart or a rebalance goes on counting).
    """

    __slots__ = (
        "_envelope",
        "attempt",
        "headers",
        "id",
        "key",
        "offset",
        "partition",
        "raw",
        "topic",
        "type",
    )

    def __init__(
        self,
        *,
        id: str,
        type: str,
        raw: bytes,
        headers: Headers,
        key: bytes | None,
        attempt: int,
        topic: str,
        partition: int,
        offset: int,
    ) -> None:
        self.id = id
        self.type = type
        self.raw = raw
        self.headers = headers
        self.key = key
        self.attempt = attempt
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self._envelope: WebhookEnvelope[Any] | None = None

    @property
    def envelope(self) -> WebhookEnvelope[Any]:
        """The full model (``.event.id``, ``.event.type``, ``.data`` typed by event type)."""
        if self._envelope is None:
            from schemas.events import parse_event  # noqa: PLC0415 - parse only when asked

            self._envelope = parse_event(self.raw)
        return self._envelope

    @property
    def parsed(self) -> bool:
        """Whether :attr:`envelope` was already parsed (the worker reuses it for metrics)."""
        return self._envelope is not None

    @property
    def customer_id(self) -> str | None:
        """The record key: the customer the event concerns, when the intake found one."""
        return self.key.decode("utf-8", "replace") if self.key else None

    @property
    def delivery_id(self) -> str | None:
        return header_text(self.headers, HEADER_DELIVERY_ID)

    def header(self, name: str) -> str | None:
        """A record header as text (``None`` when absent)."""
        return header_text(self.headers, name)

    def __repr__(self) -> str:
        return f"Event(id={self.id!r}, type={self.type!r}, attempt={self.attempt})"


@runtime_checkable
class Handler(Protocol):
    """A pluggable consumer of events; one instance per enabled name.

    ``name`` equals the entry-point name it is enabled under. ``event_types`` limits the
    events it receives (an empty set means every event type pubrelay has a model for).
    ``start`` and ``stop`` must be safe to call twice and in any order: the worker calls
    ``start`` before the first event and ``stop`` after the last (in reverse start order).
    """

    @property
    def name(self) -> str: ...

    @property
    def event_types(self) -> frozenset[str]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def handle(self, event: Event) -> None: ...


M = TypeVar("M", bound=BaseModel)


@frozen
class Claim:
    """The ledger's answer to :meth:`KeyLedger.claim`.

    ``claimed``: the caller holds the key until ``mark_done``, ``release`` or the claim's
    expiry, and ``attempts`` counts this claim with every earlier one (durable across
    processes and restarts). ``held``: another holder's claim expires in ``wait_s`` seconds
    unless that holder finishes first. ``done``: the effect was completed.
    """

    state: Literal["claimed", "held", "done"]
    attempts: int = 0
    wait_s: float = 0.0


class KeyLedger(Protocol):
    """What a handler may use of the ledger: claim a key before an effect, mark it done after.

    A claim is atomic in the shared store: of several processes claiming one key, one
    gets ``claimed`` and the others ``held`` (or ``done`` once the holder marked it). The
    claim expires after ``ttl_s`` (default ``PUBRELAY_LEDGER__CLAIM_TTL_S``, 15 s), so a
    holder that died does not block the key for longer; nothing renews a handler's own
    claim, so a call that may last longer passes a ``ttl_s`` beyond its own bound.
    """

    async def is_done(self, handler: str, event_id: str) -> bool: ...

    async def mark_done(self, handler: str, event_id: str) -> None: ...

    async def claim(
        self, handler: str, key: str, token: str, *, ttl_s: float | None = None
    ) -> Claim: ...

    async def release(
        self, handler: str, key: str, token: str, *, forget_attempts: bool = False
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class HandlerContext:
    """Everything a handler factory may use; no module-level clients or registries.

    ``settings(Model)`` reads the handler's own section from ``PUBRELAY_<NAME>__*`` in the
    environment and ``.env`` (nested fields with ``__``; list and dict values as JSON), with
    ``overrides`` on top; ``env``, when given, replaces the environment and ``.env``.
    """

    name: str
    data_dir: Path
    metrics_registry: CollectorRegistry
    logger: FilteringBoundLogger
    topic_prefix: str
    env: Mapping[str, str] | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    ledger: KeyLedger | None = None
    """The worker's idempotency ledger, for handlers that de-duplicate on a key of their own
    (the e-mail handler on the publication id) beside the worker's (handler, event id)."""
    max_attempts: int | None = None
    """The worker's ``PUBRELAY_WORKER__MAX_ATTEMPTS`` (``None``: not run by a worker): a
    handler that raises ``RetryLater`` on purpose (the e-mail handler's hold) checks that an
    attempt is left after it."""

    @property
    def env_prefix(self) -> str:
        return section_env_prefix(self.name)

    def settings(self, model: type[M]) -> M:
        """The handler's settings section, validated by ``model`` (a pydantic model).

        Raises :class:`ConfigError` naming the environment variables at fault.
        """
        return load_section(model, self.name, env=self.env, overrides=self.overrides)

    def shared_settings(self, model: type[M], section: str) -> M:
        """A section several parts of pubrelay read, such as ``voucherify`` (the API key
        pair, ``PUBRELAY_VOUCHERIFY__*``), read like :meth:`settings` without overrides."""
        return load_section(model, section, env=self.env)


HandlerFactory = Callable[[HandlerContext], Handler]
"""What an entry point in group ``pubrelay.handlers`` names."""
