"""``PUBRELAY_CONSOLE__*``: the operator console's token, session and index."""

from __future__ import annotations

from pydantic import BaseModel, Field, SecretStr


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

    @property
    def enabled(self) -> bool:
        return self.token is not None and bool(self.token.get_secret_value())
