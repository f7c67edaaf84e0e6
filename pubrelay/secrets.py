"""The webhook secret: configured, or generated once into the data directory.

The generated file has mode 0600; an existing one open to its group or to others is used
with a warning (``data_file_not_private``). It is written whole to a temporary file of an
unpredictable name, created with ``O_EXCL | O_NOFOLLOW`` (a link planted in the directory
is never followed), and then linked into place.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import structlog

from bus.sqlite.db import warn_if_not_private
from pubrelay.settings import Settings
from schemas.errors import ConfigError

SECRET_FILE = "webhook-secret"  # noqa: S105 - a file name, not a secret


class SecretMissing(ConfigError):
    """No webhook secret is configured and none may be generated."""


def resolve_secrets(settings: Settings, *, generate: bool) -> list[str]:
    """The configured secrets, else the one in the data directory (created if allowed)."""
    configured = [s.get_secret_value() for s in settings.webhook.secrets]
    if configured:
        return configured
    path = settings.data_dir / SECRET_FILE
    if path.exists():
        warn_if_not_private(path)
        if settings.bus.kind == "kafka":  # one generated before, perhaps: each pod's own
            structlog.get_logger("pubrelay.secrets").warning(
                "webhook_secret_from_file",
                path=str(path),
                hint="on Kafka set PUBRELAY_WEBHOOK__SECRETS to Voucherify's secret, the "
                "same in every webhook process",
            )
        stored = path.read_text().strip()
        if not stored:
            raise SecretMissing(
                f"{path} is empty: delete it to have a new secret generated, or set "
                "PUBRELAY_WEBHOOK__SECRETS"
            )
        return [stored]
    if not generate:
        if settings.bus.kind == "kafka":
            raise SecretMissing(
                "no webhook secret: set PUBRELAY_WEBHOOK__SECRETS to the secret Voucherify "
                "shows in Project Settings > Webhooks (on Kafka none is generated: every "
                "webhook process must check Voucherify's own)"
            )
        raise SecretMissing(
            f"no webhook secret: set PUBRELAY_WEBHOOK__SECRETS or create {path} "
            "(`pubrelay serve` generates one on first start)"
        )
    value = write_new_private_token(path)
    if value is None:  # another process created it first: use theirs
        return resolve_secrets(settings, generate=False)
    print(
        f"pubrelay: generated a webhook secret in {path.resolve()} (mode 0600).\n"
        "  Voucherify signs every webhook with your project's webhook secret "
        "(Project Settings > Webhooks).\n"
        "  Put that secret in PUBRELAY_WEBHOOK__SECRETS='[\"<secret>\"]' (several during "
        "rotation), or, to try pubrelay locally,\n"
        "  sign test requests with the generated one: pubrelay send --example (or FILE)",
        file=sys.stderr,
    )
    return [value]


def write_new_private_token(path: Path) -> str | None:
    """A new random token written to ``path`` (mode 0600); None when ``path`` appeared
    meanwhile (another process won: read theirs).

    Written whole to a private temporary file, then linked into place: a crash never
    leaves an empty file, and two processes starting at once cannot both win.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    tmp, fd = _private_temporary(path)
    try:
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(value + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:  # a full disk: say which file
            raise OSError(err.errno, err.strerror, str(path)) from err
        try:
            os.link(tmp, path)
        except FileExistsError:
            return None
    finally:
        tmp.unlink(missing_ok=True)
    return value


def _private_temporary(path: Path) -> tuple[Path, int]:
    """A new file beside ``path`` with mode 0600 and a name no one can guess in advance."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}")
        try:
            return tmp, os.open(tmp, flags, 0o600)
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")
