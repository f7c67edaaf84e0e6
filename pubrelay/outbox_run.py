"""``--outbox`` (what ``make run`` runs): the whole job on one machine, nothing else installed.

Each default applies only where nothing is configured (the environment, then ``.env``):

* ``PUBRELAY_HANDLERS__ENABLED`` unset: the ``email`` handler runs;
* ``PUBRELAY_EMAIL__SMTP_URL`` unset: it writes each message to ``<data dir>/outbox/``
  (``handlers/builtin/email/outbox.py``) instead of sending it, and the console shows it;
* ``PUBRELAY_EMAIL__SENDER`` unset, and the outbox in use: the placeholder sender of
  ``pubrelay preview-email``. A configured relay needs a configured sender: customers
  never get mail from the placeholder.

So ``make run`` and then ``pubrelay send --example`` show intake to e-mail in the console.
A configured relay or handler list is used as configured. The start-up line
``outbox_defaults`` names the defaults applied.
"""

from __future__ import annotations

from typing import Final

import structlog

from handlers.builtin.email.outbox import OUTBOX_URL
from handlers.config import HandlersSettings, read_variables
from pubrelay.preview_command import PLACEHOLDER_SENDER
from pubrelay.settings import Settings

ENABLED: Final = "PUBRELAY_HANDLERS__ENABLED"
SMTP_URL: Final = "PUBRELAY_EMAIL__SMTP_URL"
SENDER: Final = "PUBRELAY_EMAIL__SENDER"

log = structlog.get_logger("pubrelay.outbox")


def with_outbox_defaults(settings: Settings) -> tuple[Settings, dict[str, str]]:
    """The settings and the handlers' variables with the defaults where nothing is set."""
    variables = {name: value for name, (value, _) in read_variables().items()}
    applied: list[str] = []
    if ENABLED not in variables:
        settings = settings.model_copy(update={"handlers": HandlersSettings(enabled=["email"])})
        applied.append(f'{ENABLED}=["email"]')
    if SMTP_URL not in variables:
        variables[SMTP_URL] = OUTBOX_URL
        applied.append(f"{SMTP_URL}={OUTBOX_URL}")
    if SENDER not in variables and variables[SMTP_URL] == OUTBOX_URL:
        variables[SENDER] = PLACEHOLDER_SENDER
        applied.append(f"{SENDER}={PLACEHOLDER_SENDER}")
    log.info("outbox_defaults", applied=applied)
    return settings, variables
