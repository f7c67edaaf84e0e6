"""Settings of the worker (``PUBRELAY_WORKER__*``), the ledger (``PUBRELAY_LEDGER__*``) and
handler selection (``PUBRELAY_HANDLERS__*``).

A handler's own settings are not here: each plugin reads ``PUBRELAY_<NAME>__*`` into its
own model through :meth:`handlers.types.HandlerContext.settings`, so installing a plugin
never needs a change in pubrelay. :func:`load_section` reads such a section with
pydantic-settings, the same way the root configuration (``pubrelay/settings.py``) reads
the rest: environment and ``.env``, nested fields with ``__``, lists and maps as JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from schemas.errors import ConfigError
from schemas.topics import DEFAULT_GROUP_PREFIX

M = TypeVar("M", bound=BaseModel)

ENV_PREFIX = "PUBRELAY_"

DEFAULT_LEDGER_RETENTION_S = 30 * 24 * 3600.0
DEFAULT_CLAIM_TTL_S = 15.0


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
        default=1000,
        gt=0,
        description=(
            "records per handler fetched and not yet committed (waiting, or finished behind an "
            "unfinished one); fetching pauses at the bound (back-pressure)"
        ),
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
    claim_ttl_s: float = Field(
        default=DEFAULT_CLAIM_TTL_S,
        ge=1,
        description=(
            "life of a worker's claim on an event, renewed every third of it while the "
            "handler call runs: a worker that died blocks its events this long at most"
        ),
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value and not value.startswith(("sqlite:///", "redis://", "rediss://", "unix://")):
            raise ValueError("must start with sqlite:///, redis://, rediss:// or unix://")
        return value


def section_env_prefix(handler: str) -> str:
    """``PUBRELAY_<NAME>__``: where handler ``handler`` reads its settings."""
    return f"{ENV_PREFIX}{_section_field(handler).upper()}__"


def _section_field(handler: str) -> str:
    return handler.replace("-", "_")


class _MappingEnvSource(EnvSettingsSource):
    """The environment source reading a given mapping instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._env = env
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {key.lower(): value for key, value in self._env.items()}


def _section_base(env: Mapping[str, str] | None) -> type[BaseSettings]:
    """The settings class a section is read with: environment and ``.env``, or ``env``."""

    class SectionSettings(BaseSettings):
        model_config = SettingsConfigDict(
            env_prefix=ENV_PREFIX,
            env_nested_delimiter="__",
            env_file=".env" if env is None else None,
            extra="ignore",
        )

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            if env is None:
                return (init_settings, env_settings, dotenv_settings)
            return (init_settings, _MappingEnvSource(settings_cls, env))

    return SectionSettings


def load_section(
    model: type[M],
    handler: str,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> M:
    """Handler ``handler``'s settings section, validated by ``model``.

    Read from ``PUBRELAY_<NAME>__*`` in the environment and in ``.env`` (the environment
    wins), or from ``env`` alone when given (tests, embedding); ``overrides`` win over both.
    Raises :class:`ConfigError` naming the environment variables at fault.
    """
    name = _section_field(handler)
    fields: dict[str, Any] = {name: (model, ...)}
    root: Callable[..., BaseSettings] = create_model(
        "HandlerSettings", __base__=_section_base(env), **fields
    )
    prefix = section_env_prefix(handler)
    try:
        loaded = root(**{name: dict(overrides or {})})
    except ValidationError as err:
        problems = [
            prefix + "__".join(str(p).upper() for p in item["loc"][1:]) + ": " + item["msg"]
            for item in err.errors()
        ]
        raise ConfigError(
            f"invalid settings for handler {handler!r}: " + "; ".join(problems)
        ) from None
    except SettingsError as err:
        cause = f": {err.__cause__}" if err.__cause__ else ""
        raise ConfigError(
            f"invalid settings for handler {handler!r}: a {prefix}* value is not valid JSON "
            f'(lists are written like \'["a", "b"]\', maps like \'{{"k": "v"}}\'){cause}'
        ) from None
    section: M = getattr(loaded, name)
    return section
