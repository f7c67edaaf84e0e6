"""The embedded bus: a log of topics in one SQLite file.

``log`` (:class:`SqliteBus`: publishing, scheduling retention) · ``writer`` (the bus's
writer process: the group commit, retention steps) · ``pipe`` and ``writer_process`` (a
writer process's two ends, shared with the idempotency ledger's) · ``retention`` (what
may be deleted, in small chunks) · ``subscription`` (consumer-group members) · ``owner``
(one consuming process per file) · ``schema`` (the file's tables) · ``connection`` (how
a connection is opened, transactions: the standard library only, for the writer
processes) · ``db`` (connections on threads of their own, private files; shared with the
ledger). ``SqliteBus`` loads on first use, like the names of :mod:`bus`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bus.sqlite.log import SqliteBus

__all__ = ["SqliteBus"]


def __getattr__(name: str) -> Any:
    if name == "SqliteBus":
        from bus.sqlite.log import SqliteBus  # noqa: PLC0415 - loaded on first use

        return SqliteBus
    raise AttributeError(f"module 'bus.sqlite' has no attribute {name!r}")
