"""The embedded bus: a log of topics in one SQLite file.

``log`` (:class:`SqliteBus`: publishing, group commit, scheduling retention) ·
``retention`` (what may be deleted, in small chunks) · ``subscription`` (consumer-group
members) · ``owner`` (one consuming process per file) · ``schema`` (the file's tables) ·
``db`` (connections, transactions and their threads, private files; shared with the
idempotency ledger).
"""

from bus.sqlite.log import SqliteBus

__all__ = ["SqliteBus"]
