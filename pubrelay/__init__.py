"""pubrelay: verified, durable intake of Voucherify webhooks."""
