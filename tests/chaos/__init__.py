"""`make chaos`: named fault scenarios against real processes on loopback, one table.

See ``docs/reliability.md`` for what each scenario does and proves, and
:mod:`tests.chaos.__main__` for the command line.
"""
