"""The one exception hierarchy of pubrelay; every layer may import it.

Each class carries its policy as class attributes (``retriable``) so callers decide by
type, never by message. Control-flow exceptions raised by handlers are verbs
(``RetryLater``, ``SkipEvent``). Beside :class:`ConfigError`, the deploy files'
placeholders the settings refuse (:data:`EXAMPLE_PLACEHOLDERS`).
"""

from __future__ import annotations

from typing import Final


class PubrelayError(Exception):
    """Root of every error pubrelay raises on purpose."""

    retriable: bool = False


class ConfigError(PubrelayError):
    """The configuration is invalid; the message names the setting."""


class BusInUse(ConfigError):
    """Another process already consumes this embedded bus (one per data directory); like a
    port already taken, the process stops at start."""


class BusError(PubrelayError):
    """The bus failed to do what was asked."""

    retriable = True


class BusUnavailable(BusError):
    """The bus did not acknowledge in time, or cannot be reached; nothing was acknowledged."""


class RecordTooLarge(BusError):
    """The bus refuses the record for its size, and always will (Kafka's
    ``MESSAGE_TOO_LARGE``): nothing was stored, and retrying cannot help."""

    retriable = False


class TopicMissing(BusError):
    """A topic the process needs does not exist and may not be created."""

    retriable = False


class HandlerError(PubrelayError):
    """A handler failed permanently: the event goes to the dead-letter topic."""


class RetryLater(PubrelayError):
    """A handler asks for the event to be retried after a back-off.

    ``delay_s`` overrides the computed back-off (for example from a ``Retry-After`` header).
    ``keep_order=False`` lets the customer's later events run while this one waits (the
    event steps out of its lane until its retry): for a handler waiting for one of those
    later events, such as the e-mail handler's hold for a publication's sibling event.
    """

    retriable = True

    def __init__(
        self, message: str = "", *, delay_s: float | None = None, keep_order: bool = True
    ) -> None:
        super().__init__(message)
        self.delay_s = delay_s
        self.keep_order = keep_order


class SkipEvent(PubrelayError):
    """A handler decides not to act on this event; it is counted and logged, not retried."""


class PluginError(PubrelayError):
    """A handler plugin is unknown or cannot be loaded; start-up stops."""


class ApiError(PubrelayError):
    """Voucherify's API refused a request, or answered what its contract does not allow."""


class ApiAuthError(ApiError):
    """The API refused the credentials (401, 403): a setting to fix, not to retry."""


class ApiQuotaError(ApiError):
    """The API's quota is spent, or pubrelay's share of it (429 after the retries, or
    ``X-Rate-Limit-Remaining`` below the reserve): stop and try again later."""

    retriable = True


class ApiUnavailable(ApiError):
    """The API could not be reached or kept failing (network errors, timeouts, 5xx)."""

    retriable = True


class PageLimitReached(ApiError):
    """The listing would need a page beyond the API's last (1000): the window is too deep."""


EXAMPLE_PLACEHOLDERS: Final = ("replace-with-", "REPLACE_ME")
"""How the values of deploy/pubrelay.env.example and deploy/k8s/secret.template.yaml
begin: never a real secret, id or token."""


class ReconcileWindowTooOld(ConfigError):
    """A reconciliation asked to look back further than its store remembers arrivals."""


class ReconcileBusy(PubrelayError):
    """Another runner holds the reconciliation lease (or took it over): this run stops."""
