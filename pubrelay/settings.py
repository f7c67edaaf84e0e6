"""The one root configuration, loaded once at the edge (the CLI) and passed down.

Environment variables: prefix ``PUBRELAY_``, nested sections with ``__``
(``PUBRELAY_HTTP__PORT=8081``, ``PUBRELAY_WEBHOOK__SECRETS='["s1","s2"]'``). A ``.env``
file in the working directory is read too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal, Self

from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from bus.config import RECORD_HEADROOM_BYTES, BusSettings
from consumer.config import HttpSettings, WebhookSettings
from handlers.builtin.voucherify_api import VoucherifySettings
from handlers.config import (
    ENV_PREFIX,
    HandlersSettings,
    LedgerSettings,
    WorkerSettings,
    read_variables,
)
from handlers.config_errors import describe_json_error, describe_validation_error
from handlers.reconcile.config import ReconcileSettings
from pubrelay.console.config import ConsoleSettings
from pubrelay.settings_catalog import unknown_names
from schemas.errors import ConfigError


class LogSettings(BaseModel):
    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="`debug`, `info`, `warning`, `error`"
    )
    format: Literal["auto", "json", "console"] = Field(
        default="auto", description="`json`, `console`, or `auto` (console on a terminal)"
    )


VOUCHERIFY_TIMEOUT_S: Final = 10.0
"""How long Voucherify waits for a webhook's answer before it counts a failed delivery."""
LIVE_GROUP_REPORTS: Final = 4
"""Lag reports (each marks a running worker's group as seen) an embedded bus's retention
spans at least."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PUBRELAY_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    data_dir: Path = Field(
        default=Path("var"),
        description=(
            "generated secret, embedded bus, embedded ledger (files created mode "
            "0600; see [The data directory](#the-data-directory))"
        ),
    )
    http: HttpSettings = HttpSettings()
    webhook: WebhookSettings = WebhookSettings()
    bus: BusSettings = BusSettings()
    log: LogSettings = LogSettings()
    handlers: HandlersSettings = HandlersSettings()
    worker: WorkerSettings = WorkerSettings()
    ledger: LedgerSettings = LedgerSettings()
    voucherify: VoucherifySettings = VoucherifySettings()
    reconcile: ReconcileSettings = ReconcileSettings()
    console: ConsoleSettings = ConsoleSettings()

    @model_validator(mode="after")
    def _body_fits_the_bus(self) -> Self:
        """A body the intake accepts must fit a Kafka record, or it would be refused forever."""
        body, record = self.http.max_body_bytes, self.bus.max_record_bytes
        if self.bus.kind == "kafka" and body + RECORD_HEADROOM_BYTES > record:
            raise ValueError(
                f"PUBRELAY_HTTP__MAX_BODY_BYTES={body} plus {RECORD_HEADROOM_BYTES} bytes for "
                f"the record's key and headers must fit PUBRELAY_BUS__MAX_RECORD_BYTES={record}: "
                f"lower the first or raise the second to at least {body + RECORD_HEADROOM_BYTES}"
            )
        return self

    @model_validator(mode="after")
    def _answered_within_voucherify_timeout(self) -> Self:
        """A delivery whose body arrives slowly, then waits the whole publish bound, must
        still be answered before Voucherify gives up on it (10 s) and counts a failure."""
        read, publish = self.http.body_read_timeout_s, self.bus.publish_timeout_s
        if read + publish >= VOUCHERIFY_TIMEOUT_S:
            raise ValueError(
                f"PUBRELAY_HTTP__BODY_READ_TIMEOUT_S={read:g} plus "
                f"PUBRELAY_BUS__PUBLISH_TIMEOUT_S={publish:g} must stay under "
                f"{VOUCHERIFY_TIMEOUT_S:g} s, Voucherify's wait for an answer: lower either"
            )
        return self

    @model_validator(mode="after")
    def _retention_sees_live_workers(self) -> Self:
        """The embedded bus's retention passes over a consumer group not seen for as long
        as itself; a live worker is seen at every lag report."""
        retention, lag = self.bus.retention_s, self.worker.lag_interval_s
        if self.bus.kind == "sqlite" and retention < LIVE_GROUP_REPORTS * lag:
            raise ValueError(
                f"PUBRELAY_BUS__RETENTION_S={retention:g} must be at least "
                f"{LIVE_GROUP_REPORTS} times PUBRELAY_WORKER__LAG_INTERVAL_S={lag:g}: a "
                "running worker's group, seen at each lag report, would look gone and its "
                "unhandled records be deleted"
            )
        return self

    @property
    def sqlite_bus_path(self) -> Path:
        if self.bus.url.startswith("sqlite:///"):
            return Path(self.bus.url.removeprefix("sqlite:///"))
        return self.data_dir / "bus.sqlite3"


def load_settings(**overrides: object) -> Settings:
    """Load settings from the environment and ``.env``; every problem is one line naming
    its variable (:class:`ConfigError`), and a ``PUBRELAY_*`` name no setting reads is one."""
    values = {name: value for name, (value, _) in read_variables().items()}
    lines = unknown_names(values)
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as err:
        lines += describe_validation_error(err, Settings, ENV_PREFIX, values)
    except SettingsError:
        # Raised for values that must be JSON (lists, maps) but are not.
        lines += describe_json_error(Settings, ENV_PREFIX, values) or [
            "a PUBRELAY_* value that must be JSON is not valid JSON"
        ]
    if lines:
        raise ConfigError("\n".join(lines))
    return settings


def describe_settings(
    model: type[BaseModel] = Settings, prefix: str = "PUBRELAY_"
) -> list[tuple[str, str, str]]:
    """Every environment variable with its default and description (for docs and `config`)."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        env = prefix + name.upper()
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += describe_settings(annotation, env + "__")
            continue
        default = field.get_default(call_default_factory=True)
        shown = "" if default in (None, "", []) else str(default)
        rows.append((env, shown, field.description or ""))
    return rows
