"""The exit codes of the ``pubrelay`` command (the README's "Command line" lists them)."""

from __future__ import annotations

from typing import Final

EXIT_OK: Final = 0
EXIT_CONFIG: Final = 2
"""A bad setting, an unknown or broken plugin, a port already taken, a data directory that
is not one or cannot be written, an embedded bus (data directory) another process already
consumes."""
EXIT_UNAVAILABLE: Final = 3
"""The bus could not be reached at start (or, for ``reconcile``, failed during its run), or
a data file (the ledger, the console's index, reconciliation's store) could not be opened
or written, on a full disk for example."""
EXIT_WORKER_FAILED: Final = 4
"""The worker stopped on an error."""
EXIT_RECONCILE_FAILED: Final = 5
"""``pubrelay reconcile`` could not finish: the Voucherify API refused the key pair or the
quota, could not be reached, another run holds the lease, or the window is deeper than
the API lists (its last page, or the request budget)."""
EXIT_BROKEN_PIPE: Final = 141
"""The reader of the output went away (``pubrelay dlq list | head``): what a command that
SIGPIPE ends exits with in a shell, without a message."""
EXIT_INTERRUPTED: Final = 130
"""Ctrl-C (SIGINT) stopped a command (``serve``, ``webhook`` and ``worker`` take SIGINT as a
request to stop and exit 0)."""
