"""Reconciliation with Voucherify's Publications API: find the publications whose webhook
never arrived and inject them as ordinary events (see docs/architecture.md)."""
