"""``@frozen``: a dataclass the type checker holds immutable, built without the cost of
immutability at run time.

A ``@dataclass(frozen=True)`` sets each field through ``object.__setattr__``: 1.5 to 2.5 µs
to build one of seven fields, against 0.3 µs for a plain one (``docs/performance.md``).
The classes built once per request or per event use this instead: mypy refuses any
assignment to their fields, equality and hashing are a frozen dataclass's (by fields),
and only a caller that ignores the type checker could change one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

__all__ = ["frozen"]

T = TypeVar("T")


@dataclass_transform(frozen_default=True)
def frozen(cls: type[T]) -> type[T]:
    """Make ``cls`` a slotted dataclass, frozen for the type checker."""
    return dataclass(slots=True, unsafe_hash=True)(cls)
