"""Every code of a publication, whichever event brought it, and which are missing (no I/O).

A publication of several codes (the publish API with ``count > 1``) reaches pubrelay as two
events (both shapes: ``schemas/examples/``):

* ``publication.succeeded`` lists every voucher in ``vouchers`` (with their ids);
* ``customer.publication.succeeded`` carries one ``voucher``, while ``publication.vouchers_id``
  lists the id of every voucher of the publication;
* the record reconciliation injects (``handlers/reconcile/record.py``) is a
  ``customer.publication.succeeded`` whose ``voucher`` is the first code and whose
  ``publication.vouchers`` lists every code.

:func:`publication_codes` reads the codes an event carries, each once, and the voucher ids
``publication.vouchers_id`` lists that none of them covers: the e-mail handler completes
those from the sibling event, from Voucherify's API, or says they are missing
(``handlers/builtin/email/handler.py``); the CRM handler's ``codes`` property is written
only from an event that lists them all (``handlers/builtin/crm/properties.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from schemas.events import CustomerPublicationSucceededData, PublicationSucceededData
from schemas.voucher import Voucher

__all__ = ["PublicationCodes", "PublicationData", "publication_codes"]

PublicationData = CustomerPublicationSucceededData | PublicationSucceededData


@dataclass(frozen=True, slots=True)
class PublicationCodes:
    """The vouchers an event carries (each code once, in Voucherify's order) and the ids of
    the publication's vouchers not among them."""

    vouchers: tuple[Voucher, ...]
    missing_ids: tuple[str, ...]

    @property
    def complete(self) -> bool:
        return not self.missing_ids

    @property
    def codes(self) -> list[str]:
        return [v.code for v in self.vouchers]

    def completed_with(self, found: Iterable[Voucher]) -> PublicationCodes:
        """These codes plus ``found`` (vouchers read elsewhere, by id); still missing: the
        ids ``found`` did not cover."""
        extra = [v for v in found if v.id in self.missing_ids]
        covered = {v.id for v in extra}
        return PublicationCodes(
            vouchers=_unique([*self.vouchers, *extra]),
            missing_ids=tuple(i for i in self.missing_ids if i not in covered),
        )


def publication_codes(data: PublicationData) -> PublicationCodes:
    """The codes ``data`` carries and the voucher ids of its publication it lacks.

    Complete when every id ``publication.vouchers_id`` lists is a carried voucher's id, or
    when the event carries at least as many codes as ids are listed (bare codes without
    ids: reconciliation's ``publication.vouchers``, an older payload's ``codes``).
    """
    vouchers = _unique(_carried(data))
    pub = data.publication
    listed = list(dict.fromkeys(i for i in (pub.vouchers_id or ()) if i)) if pub else []
    if len(vouchers) >= len(listed):
        return PublicationCodes(vouchers, ())
    carried_ids = {v.id for v in vouchers if v.id}
    return PublicationCodes(vouchers, tuple(i for i in listed if i not in carried_ids))


def _carried(data: PublicationData) -> list[Voucher]:
    pub = data.publication
    if isinstance(data, PublicationSucceededData):
        found = data.all_vouchers
        if found:
            return found
        return [Voucher.model_construct(code=code) for code in data.codes]
    carried = [data.voucher]
    if pub is not None:
        if pub.voucher is not None:
            carried.append(pub.voucher)
        carried.extend(Voucher.model_construct(code=code) for code in pub.vouchers or ())
    return carried


def _unique(vouchers: Iterable[Voucher]) -> tuple[Voucher, ...]:
    """Each code once (the first, fullest, occurrence), empty codes left out."""
    seen: dict[str, Voucher] = {}
    for voucher in vouchers:
        if voucher.code and voucher.code not in seen:
            seen[voucher.code] = voucher
    return tuple(seen.values())
