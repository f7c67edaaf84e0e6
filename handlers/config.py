"""Settings of the worker (``PUBRELAY_WORKER__*``), the ledger (``PUBRELAY_LEDGER__*``) and
handler selection (``PUBRELAY_HANDLERS__*``).

A handler's own settings are not here: each plugin reads ``PUBRELAY_<NAME>__*`` into its
own model through :meth:`handlers.types.HandlerContext.settings`, so installing a plugin
never needs a change in pubrelay.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator, model_validator

from schemas.topics import DEFAULT_GROUP_PREFIX

DEFAULT_LEDGER_RETENTION_S = 30 * 24 * 3600.0


class HandlersSettings(BaseModel):
    enabled: list[str] = Field(default_factory=list, description="handler names to run")


class WorkerSettings(BaseModel):
    """How the worker consumes, retries and shuts down (per handler)."""

    shutdown_timeout_s: float = Field(
        default=20.0, ge=0, description="bound for finishing in-flight events on stop"
    )
    revoke_timeout_s: float = Field(
        default=8.0,
        ge=0,
        description=(
            "bound for finishing in-flight handler calls when partitions are revoked "
            "(also capped by shutdown_timeout_s); keep it below the consumer group's "
            "rebalance timeout (10 s by default)"
        ),
    )
    handler_timeout_s: float = Field(
        default=60.0,
        ge=0,
        description="bound for one handler call, 0 = none; a timeout is retried (transient)",
    )
    concurrency: int = Field(
        default=32, gt=0, description="events of different customers handled at once, per handler"
    )
    max_buffered: int = Field(
        default=1000, gt=0, description="fetched but unfinished events per handler (back-pressure)"
    )
    fetch_max_records: int = Field(default=500, gt=0, description="records per fetch, at most")
    fetch_timeout_s: float = Field(
        default=1.0, gt=0, description="wait for records per fetch (bounds stop latency)"
    )
    commit_interval_s: float = Field(
        default=1.0, gt=0, description="how often finished offsets are committed"
    )
    lag_interval_s: float = Field(default=15.0, gt=0, description="consumer-lag gauge refresh")
    group_prefix: str = Field(
        default=DEFAULT_GROUP_PREFIX,
        description="consumer group of a handler = prefix + handler name",
    )

    max_attempts: int = Field(default=5, ge=1, description="handler attempts before dead-letter")
    retry_base_delay_s: float = Field(
        default=1.0, ge=0, description="first retry back-off; doubles per attempt"
    )
    retry_max_delay_s: float = Field(
        default=300.0, ge=0, description="cap of a retry back-off (also of RetryLater delay_s)"
    )
    retry_jitter: float = Field(
        default=0.2, ge=0, le=1, description="fraction of a back-off randomly taken off"
    )

    bus_backoff_initial_s: float = Field(default=0.5, gt=0, description="after a broker error")
    bus_backoff_max_s: float = Field(default=30.0, gt=0, description="cap of that back-off")

    @model_validator(mode="after")
    def _delays_ordered(self) -> WorkerSettings:
        if self.retry_max_delay_s < self.retry_base_delay_s:
            raise ValueError("retry_max_delay_s must be >= retry_base_delay_s")
        if self.bus_backoff_max_s < self.bus_backoff_initial_s:
            raise ValueError("bus_backoff_max_s must be >= bus_backoff_initial_s")
        return self


class LedgerSettings(BaseModel):
    """Where handlers record completed effects: SQLite in the data dir by default, or Redis."""

    url: str = Field(default="", description="sqlite:///path or redis://host:port/db")
    retention_s: float = Field(
        default=DEFAULT_LEDGER_RETENTION_S,
        gt=0,
        description="how long a completed (handler, event id) is remembered",
    )
    redis_key_prefix: str = Field(
        default="pubrelay:ledger:", description="Redis ledger keys: prefix + handler:event id"
    )
    timeout_s: float = Field(default=5.0, gt=0, description="bound for one ledger operation")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value and not value.startswith(("sqlite:///", "redis://", "rediss://", "unix://")):
            raise ValueError("must start with sqlite:///, redis://, rediss:// or unix://")
        return value
