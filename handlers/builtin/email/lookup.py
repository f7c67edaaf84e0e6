"""The codes an event lacks, read from Voucherify's API (``GET /v1/vouchers/{id}``).

Used by the e-mail handler after its hold for a publication's sibling event ran out
(:mod:`handlers.builtin.email.handler`), only when ``PUBRELAY_VOUCHERIFY__APP_ID`` and
``APP_TOKEN`` are set. The client (:mod:`handlers.builtin.voucherify_api`) keeps inside its
share of the project's API quota and paces its requests; lookups run one at a time. A
voucher that cannot be read (quota reserve reached, API down, unknown id) stays missing:
the handler then sends what it has and says which ids were missing.
"""

from __future__ import annotations

import asyncio

from prometheus_client import Counter
from pydantic import ValidationError
from structlog.typing import FilteringBoundLogger

from handlers.builtin.publication_codes import PublicationCodes
from handlers.builtin.voucherify_api import VoucherifyApi, VoucherifySettings
from schemas.errors import ApiError
from schemas.masking import mask_emails
from schemas.voucher import Voucher

__all__ = ["VoucherLookup"]


class VoucherLookup:
    """Reads missing vouchers by id, between :meth:`start` and :meth:`stop`."""

    def __init__(
        self, settings: VoucherifySettings, *, logger: FilteringBoundLogger, lookups: Counter
    ) -> None:
        self._settings = settings
        self._log = logger
        self._lookups = lookups
        self._api: VoucherifyApi | None = None
        self._one_at_a_time = asyncio.Lock()

    async def start(self) -> None:
        if self._api is None:
            api = VoucherifyApi(self._settings, user_agent="pubrelay-email")
            self._api = await api.__aenter__()

    async def stop(self) -> None:
        if self._api is not None:
            api, self._api = self._api, None
            await api.__aexit__(None, None, None)

    async def complete(self, codes: PublicationCodes, *, event_id: str) -> PublicationCodes:
        """``codes`` with the vouchers its missing ids name, as far as the API gives them."""
        if self._api is None or codes.complete:
            return codes
        found: list[Voucher] = []
        async with self._one_at_a_time:
            for voucher_id in codes.missing_ids:
                try:
                    body = await self._api.get_voucher(voucher_id)
                    voucher = Voucher.model_validate(body)
                except (ApiError, ValidationError) as err:
                    self._lookups.labels("failed").inc()
                    self._log.warning(
                        "email_voucher_lookup_failed",
                        event_id=event_id,
                        voucher_id=voucher_id,
                        error_type=type(err).__name__,
                        error=mask_emails(str(err), max_chars=300),
                    )
                    continue
                self._lookups.labels("found").inc()
                found.append(voucher.model_copy(update={"id": voucher.id or voucher_id}))
        return codes.completed_with(found)
