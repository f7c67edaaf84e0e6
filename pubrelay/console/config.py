"""``PUBRELAY_CONSOLE__*``: the operator console's token, session and index."""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel, Field, SecretStr, field_validator

MIN_TOKEN_CHARS: Final = 16
"""A shorter token could be guessed at the 4 tries a second the login allows."""


class ConsoleSettings(BaseModel):
    """The console is off unless a token is set (``make run`` generates one)."""

    token: SecretStr | None = Field(
        default=None,
        description=(
            "the console's access token (`Authorization: Bearer`, or the login form); "
            "unset: no console (`pubrelay serve --console` generates `<data dir>/console-token`)"
        ),
    )
    session_ttl_s: float = Field(
        default=8 * 3600.0, gt=0, description="life of a console login session (cookie)"
    )
    index_url: str = Field(
        default="",
        description=(
            "`sqlite:///path` of the event index; empty: beside the ledger (Redis when "
            "`PUBRELAY_LEDGER__URL` is Redis, else `<data dir>/index.sqlite3`)"
        ),
    )
    redis_key_prefix: str = Field(
        default="pubrelay:index:",
        description="the index's Redis keys (when the ledger is Redis): prefix + kind:id",
    )
    index_queue_max: int = Field(
        default=10_000,
        ge=1,
        description=(
            "entries waiting to be written to the index at most; past that new ones are "
            "dropped and counted (the intake never waits for the index)"
        ),
    )

    @field_validator("token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        value = token.get_secret_value() if token is not None else ""
        if value and len("".join(value.split())) < MIN_TOKEN_CHARS:
            raise ValueError(
                f"the console token must have at least {MIN_TOKEN_CHARS} characters besides "
                "spaces (4 guesses a second find a short one); generate one with "
                "`openssl rand -hex 32`, or unset it and let `pubrelay serve --console` "
                "generate one"
            )
        return token

    @field_validator("index_url")
    @classmethod
    def _sqlite_file(cls, value: str) -> str:
        if "://" in value and not value.startswith("sqlite:///"):
            raise ValueError("must be sqlite:///path (or empty: beside the ledger)")
        if value == "sqlite:///":
            raise ValueError("sqlite:/// needs a file path (empty: beside the ledger)")
        return value

    @property
    def enabled(self) -> bool:
        return self.token is not None and bool(self.token.get_secret_value())
