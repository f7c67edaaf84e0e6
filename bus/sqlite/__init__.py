"""The embedded bus: a log of topics in one SQLite file."""

from bus.sqlite.log import SqliteBus

__all__ = ["SqliteBus"]
