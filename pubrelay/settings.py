"""The one root configuration, loaded once at the edge (the CLI) and passed down.

Environment variables: prefix ``PUBRELAY_``, nested sections with ``__``
(``PUBRELAY_HTTP__PORT=8081``, ``PUBRELAY_WEBHOOK__SECRETS='["s1","s2"]'``). A ``.env``
file in the working directory is read too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from bus.config import RECORD_HEADROOM_BYTES, BusSettings
from consumer.config import HttpSettings, WebhookSettings
from handlers.builtin.voucherify_api import VoucherifySettings
from handlers.config import HandlersSettings, LedgerSettings, WorkerSettings
from handlers.reconcile.config import ReconcileSettings
from schemas.errors import ConfigError


class LogSettings(BaseModel):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: console on a terminal, JSON otherwise"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PUBRELAY_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    data_dir: Path = Field(default=Path("var"), description="secrets, embedded bus and ledger")
    http: HttpSettings = HttpSettings()
    webhook: WebhookSettings = WebhookSettings()
    bus: BusSettings = BusSettings()
    log: LogSettings = LogSettings()
    handlers: HandlersSettings = HandlersSettings()
    worker: WorkerSettings = WorkerSettings()
    ledger: LedgerSettings = LedgerSettings()
    voucherify: VoucherifySettings = VoucherifySettings()
    reconcile: ReconcileSettings = ReconcileSettings()

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

    @property
    def sqlite_bus_path(self) -> Path:
        if self.bus.url.startswith("sqlite:///"):
            return Path(self.bus.url.removeprefix("sqlite:///"))
        return self.data_dir / "bus.sqlite3"


def load_settings(**overrides: object) -> Settings:
    """Load settings from the environment, turning validation errors into one clear message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as err:
        problems = []
        for item in err.errors():
            name = "PUBRELAY_" + "__".join(str(p).upper() for p in item["loc"])
            # A check across settings (no location) names its variables in its message.
            problems.append(f"{name}: {item['msg']}" if item["loc"] else item["msg"])
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    except SettingsError as err:
        # Raised for values that must be JSON (lists, maps) but are not.
        section = str(err).split('"')[1] if '"' in str(err) else "?"
        cause = f": {err.__cause__}" if err.__cause__ else ""
        raise ConfigError(
            f"invalid configuration: PUBRELAY_{section.upper()}__*: a value is not valid "
            f'JSON (lists are written like \'["a", "b"]\'){cause}'
        ) from None


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
