"""The embedded bus: a log of topics in one SQLite file.

``log`` (:class:`SqliteBus`: publishing, group commit, retention) · ``subscription``
(consumer-group members) · ``schema`` (the file's tables) · ``db`` (connections,
transactions and their threads, shared with the idempotency ledger).
"""

from bus.sqlite.log import SqliteBus

__all__ = ["SqliteBus"]
