"""``--outbox`` (what ``make run`` runs): the whole job on one machine, nothing else installed.

Each default applies only where nothing is configured (the environment, then ``.env``):

* ``PUBRELAY_HANDLERS__ENABLED`` unset: the ``email`` handler runs;
* ``PUBRELAY_EMAIL__SMTP_URL`` unset: it writes each message to ``<data dir>/outbox/``
  (``handlers/builtin/email/outbox.py``) instead of sending it, and the console shows it;
* ``PUBRELAY_EMAIL__SENDER`` unset: the placeholder sender of ``pubrelay preview-email``.

So ``make run`` and then ``pubrelay send --example`` show intake to e-mail in the console.
A configured relay or handler list is used as configured.
"""

from __future__ import annotations

from typing import Final

from handlers.builtin.email.outbox import OUTBOX_URL
from handlers.config import HandlersSettings, read_variables
from pubrelay.preview_command import PLACEHOLDER_SENDER
from pubrelay.settings import Settings

ENABLED: Final = "PUBRELAY_HANDLERS__ENABLED"
DEFAULTS: Final = {
    "PUBRELAY_EMAIL__SMTP_URL": OUTBOX_URL,
    "PUBRELAY_EMAIL__SENDER": PLACEHOLDER_SENDER,
}


def with_outbox_defaults(settings: Settings) -> tuple[Settings, dict[str, str]]:
    """The settings and the handlers' variables with the defaults where nothing is set."""
    variables = {name: value for name, (value, _) in read_variables().items()}
    if ENABLED not in variables:
        settings = settings.model_copy(update={"handlers": HandlersSettings(enabled=["email"])})
    for name, value in DEFAULTS.items():
        variables.setdefault(name, value)
    return settings, variables
