"""The contract: Voucherify envelope and event models, and the record on the bus."""
