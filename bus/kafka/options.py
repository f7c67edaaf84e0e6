"""How the Kafka bus's aiokafka clients are configured.

The producer, the consumers and the admin client share one set of connection options
(bootstrap servers, client id, request timeout, TLS, SASL), built once from
:class:`~bus.config.BusSettings` by :func:`client_options`; a misconfiguration (an
unreadable certificate, SASL without a user) is a :class:`~schemas.errors.ConfigError`
at construction, before anything connects. Consumer-group timers are a
:class:`GroupTiming`.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka.helpers import create_ssl_context

from bus.config import BusSettings
from schemas.errors import ConfigError

ClientOptions = Mapping[str, Any]
"""Keyword arguments every aiokafka client of one bus is built with."""


@dataclass(frozen=True, slots=True)
class GroupTiming:
    """Consumer-group timers.

    The defaults are aiokafka's, safe for production: a member that blocks its event
    loop for a few seconds is not expelled. Tests against Tansu shorten them, because a
    group join there waits for the rebalance timeout and a re-join for the old member's
    session to expire.
    """

    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    rebalance_timeout_ms: int | None = None
    max_poll_interval_ms: int = 300_000

    @property
    def join_timeout_ms(self) -> int:
        """How long a group join may take: the rebalance timeout (aiokafka's default for it
        is the session timeout)."""
        return self.rebalance_timeout_ms or self.session_timeout_ms


def acks(value: str) -> str | int:
    """``PUBRELAY_BUS__ACKS`` as aiokafka takes it: ``"all"`` or a number of replicas."""
    return "all" if value == "all" else int(value)


def ssl_context(settings: BusSettings) -> ssl.SSLContext | None:
    """The TLS context for ``SSL`` and ``SASL_SSL``; ``None`` for the plaintext protocols."""
    if settings.security_protocol not in ("SSL", "SASL_SSL"):
        return None
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=settings.ssl_cafile,
            certfile=settings.ssl_certfile,
            keyfile=settings.ssl_keyfile,
        )
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(
            f"PUBRELAY_BUS__SSL_*: cannot build the TLS context for the Kafka bus: {err}"
        ) from err
    return context


def client_options(settings: BusSettings) -> ClientOptions:
    """Connection options shared by the producer, the consumers and the admin client."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "client_id": settings.client_id,
        "request_timeout_ms": int(settings.request_timeout_s * 1000),
        "security_protocol": settings.security_protocol,
        "ssl_context": ssl_context(settings),
    }
    if settings.security_protocol.startswith("SASL_"):
        if settings.sasl_mechanism is None or settings.sasl_username is None:
            raise ConfigError(
                "PUBRELAY_BUS__SASL_MECHANISM and PUBRELAY_BUS__SASL_USERNAME are required "
                f"with PUBRELAY_BUS__SECURITY_PROTOCOL={settings.security_protocol}"
            )
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        password = settings.sasl_password
        options["sasl_plain_password"] = password.get_secret_value() if password else None
    return options
