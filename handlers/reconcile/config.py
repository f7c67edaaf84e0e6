"""``PUBRELAY_RECONCILE__*``: when and how far back reconciliation looks.

The key pair and the API's address are ``PUBRELAY_VOUCHERIFY__*``
(:class:`handlers.builtin.voucherify_api.VoucherifySettings`); where received publication
ids are kept follows the ledger (``PUBRELAY_LEDGER__URL``: SQLite in the data directory,
or Redis).
"""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

DAY_S = 86_400.0


class ReconcileSettings(BaseModel):
    interval_s: float = Field(
        default=0.0,
        ge=0,
        description="seconds between reconciliations run by the worker, 0 = off "
        "(one runner at a time across processes)",
    )
    lookback_s: float = Field(
        default=3 * DAY_S, gt=0, description="how far back the first run looks (3 days)"
    )
    overlap_s: float = Field(
        default=3600.0,
        ge=0,
        description=("each run reads back to the newest publication already reconciled minus this"),
    )
    min_age_s: float = Field(
        default=600.0,
        ge=0,
        description="publications younger than this wait for the next run (their webhook "
        "may still be on its way or in Voucherify's first retries)",
    )
    max_requests: int = Field(
        default=200,
        gt=0,
        description=("API requests one run may make (its request budget; 100 publications each)"),
    )
    lease_s: float = Field(
        default=300.0, gt=0, description="a runner's claim on reconciliation; renewed between pages"
    )
    retention_s: float = Field(
        default=14 * DAY_S,
        gt=0,
        description=(
            "how long received publication ids are kept (at least `LOOKBACK_S` + `OVERLAP_S`)"
        ),
    )
    redis_key_prefix: str = Field(
        default="pubrelay:reconcile:",
        description="Redis keys of the received-publication store (with a Redis ledger)",
    )

    @model_validator(mode="after")
    def _kept_long_enough(self) -> ReconcileSettings:
        if self.retention_s < self.lookback_s + self.overlap_s:
            raise ValueError("retention_s must be at least lookback_s + overlap_s")
        return self
