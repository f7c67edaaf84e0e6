"""The worker runtime: consume loop, retries, dead letters, replay and the idempotency ledger.

Built-in handlers and third-party plugins use it the same way: through the contract in
:mod:`handlers.types`, never by importing from here.
"""
