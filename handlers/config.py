"""Settings of the worker (``PUBRELAY_WORKER__*``), the ledger (``PUBRELAY_LEDGER__*``) and
handler selection (``PUBRELAY_HANDLERS__*``).

A handler's own settings are not here: each plugin reads ``PUBRELAY_<NAME>__*`` into its
own model through :meth:`handlers.types.HandlerContext.settings`, so installing a plugin
never needs a change in pubrelay. :func:`load_section` reads such a section with
pydantic-settings, the same way the root configuration (``pubrelay/settings.py``) reads
the rest: environment and ``.env``, nested fields with ``__``, lists and maps as JSON.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from dotenv import dotenv_values
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

from handlers.config_errors import (
    describe_json_error,
    describe_validation_error,
    is_known,
    model_variables,
    suggestions,
    unknown_lines,
)
from schemas.errors import ConfigError
from schemas.topics import DEFAULT_GROUP_PREFIX

M = TypeVar("M", bound=BaseModel)

ENV_PREFIX = "PUBRELAY_"
ENV_FILE = ".env"

Origin = Literal["environment", ".env"]

DEFAULT_LEDGER_RETENTION_S = 30 * 24 * 3600.0
DEFAULT_CLAIM_TTL_S = 15.0


_HANDLER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def handler_name_problem(name: str) -> str:
    """Why ``name`` cannot be a handler's name (it ends up in topic, group, metric-label
    and variable names), or ``""``."""
    if _HANDLER_NAME_RE.match(name):
        return ""
    return (
        f"handler name {name!r} must be lowercase letters, digits, '-' or '_' "
        "(at most 63, starting with a letter or digit)"
    )


class HandlersSettings(BaseModel):
    enabled: list[str] = Field(
        default_factory=list,
        examples=[["email", "crm"]],
        description='JSON list of handler names to run, e.g. `["email", "crm", "metrics"]`',
    )

    @field_validator("enabled")
    @classmethod
    def _plain_names_each_once(cls, value: list[str]) -> list[str]:
        twice = sorted({name for name in value if value.count(name) > 1})
        if twice:
            raise ValueError(f"listed twice: {', '.join(twice)} (each handler runs once)")
        for name in value:
            if problem := handler_name_problem(name):
                raise ValueError(problem)
        return value


class WorkerSettings(BaseModel):
    """How the worker consumes, retries and shuts down (per handler)."""

    shutdown_timeout_s: float = Field(
        default=20.0, ge=0, description="bound for finishing in-flight events on SIGTERM"
    )
    revoke_timeout_s: float = Field(
        default=8.0,
        ge=0,
        description=(
            "bound for finishing in-flight handler calls when Kafka revokes "
            "partitions (also capped by `SHUTDOWN_TIMEOUT_S`); keep it below the "
            "consumer group's rebalance timeout (10 s by default)"
        ),
    )
    handler_timeout_s: float = Field(
        default=60.0,
        ge=0,
        description=(
            "bound for one handler call (0 = none), kept to within 0.1 s; a timeout is retried "
            "like a transient failure"
        ),
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

    max_attempts: int = Field(
        default=5, ge=1, description="handler attempts before the dead-letter topic"
    )
    retry_base_delay_s: float = Field(
        default=1.0, ge=0, description="first retry back-off; doubles per attempt"
    )
    retry_max_delay_s: float = Field(
        default=300.0, ge=0, description="cap of a back-off (also of a handler's own `Retry-After`)"
    )
    retry_jitter: float = Field(
        default=0.2, ge=0, le=1, description="fraction of a back-off randomly taken off"
    )

    bus_backoff_initial_s: float = Field(
        default=0.5, gt=0, description="back-off after a broker error"
    )
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

    url: str = Field(
        default="",
        examples=["redis://127.0.0.1:6379/0"],
        description=(
            "`sqlite:///path` or `redis://host:port/db`; empty: `<data dir>/ledger.sqlite3`"
        ),
    )
    retention_s: float = Field(
        default=DEFAULT_LEDGER_RETENTION_S,
        gt=0,
        description="how long a completed (handler, event id) is remembered",
    )
    redis_key_prefix: str = Field(
        default="pubrelay:ledger:", description="Redis keys: prefix + handler:event id"
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
        if value == "sqlite:///":
            raise ValueError("sqlite:/// needs a file path (empty: <data dir>/ledger.sqlite3)")
        if value.startswith(("redis://", "rediss://")):
            try:
                urlsplit(value).port  # noqa: B018 - raises for a port that is not a number
            except ValueError:  # its text quotes the URL, a password included
                raise ValueError("not a Redis URL: its port is not a number") from None
        return value


def read_variables(
    env: Mapping[str, str] | None = None, env_file: str | Path = ENV_FILE
) -> dict[str, tuple[str, Origin]]:
    """The ``PUBRELAY_*`` variables as set, by upper-case name, and where each came from.

    ``env`` alone when given (tests, embedding); otherwise the environment over the ``.env``
    file, as pydantic-settings reads them (names are not case-sensitive).
    """
    if env is not None:
        return {k.upper(): (v, "environment") for k, v in env.items() if _ours(k)}
    found: dict[str, tuple[str, Origin]] = {}
    if Path(env_file).is_file():
        for key, value in dotenv_values(env_file).items():
            if value is not None and _ours(key):
                found[key.upper()] = (value, ".env")
    found |= {k.upper(): (v, "environment") for k, v in os.environ.items() if _ours(k)}
    return found


def _ours(name: str) -> bool:
    return name.upper().startswith(ENV_PREFIX)


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
    values = {k: v for k, (v, _) in read_variables(env).items() if k.startswith(prefix)}
    known = model_variables(model, prefix)
    unknown = [k for k in values if not is_known(k, known)]
    if unknown:
        _refuse(handler, unknown_lines(unknown, suggestions(known, ENV_PREFIX), ENV_PREFIX))
    try:
        loaded = root(**{name: dict(overrides or {})})
    except ValidationError as err:
        _refuse(handler, describe_validation_error(err, model, prefix, values, skip=1))
    except SettingsError:
        # Raised for values that must be JSON (lists, maps) but are not.
        lines = describe_json_error(model, prefix, values)
        _refuse(handler, lines or [f"{prefix}*: a value that must be JSON is not valid JSON"])
    section: M = getattr(loaded, name)
    return section


def _refuse(handler: str, lines: list[str]) -> typing.NoReturn:
    """Stop with one line per problem, each naming its variable (handler ``handler``)."""
    raise ConfigError("\n".join(f"{line} (handler {handler!r})" for line in lines))
