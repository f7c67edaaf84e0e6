"""``pubrelay preview-email FILE``: the e-mail the ``email`` handler would send, told to a
person trying templates.

Without ``PUBRELAY_EMAIL__SENDER`` the preview uses a placeholder sender and says so (the
worker still refuses to start without one). A file that cannot be read, is not JSON or is
not a webhook body is one line on stderr and exit code 1; settings the handler would
refuse stay a configuration error (exit 2, from the command's ``main``).
"""

from __future__ import annotations

import argparse
import email.policy
import sys
from pathlib import Path
from typing import Final

from pydantic import ValidationError

from handlers.builtin.email.preview import format_preview, load_settings, render_preview
from schemas.errors import HandlerError, SkipEvent

PLACEHOLDER_SENDER: Final = "Your Shop <shop@example.com>"
EXIT_INPUT: Final = 1


def validation_line(err: ValidationError) -> str:
    """A pydantic error as one line: the first problem's place and message, and a count."""
    problems = err.errors(include_url=False, include_input=False)
    first = problems[0]
    where = ".".join(str(part) for part in first["loc"])
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{where + ': ' if where else ''}{first['msg']}{more}"


def preview_email(args: argparse.Namespace) -> int:
    settings = load_settings()
    if settings.sender is None:
        settings = settings.model_copy(update={"sender": PLACEHOLDER_SENDER})
        print(
            f"PUBRELAY_EMAIL__SENDER is not set: previewing with the placeholder sender "
            f"{PLACEHOLDER_SENDER!r} (the worker needs the real one)",
            file=sys.stderr,
        )
    try:
        raw = Path(args.file).read_bytes()
    except OSError as err:
        print(f"pubrelay preview-email: {args.file}: {err.strerror or err}", file=sys.stderr)
        return EXIT_INPUT
    try:
        message = render_preview(raw, settings)
    except SkipEvent as err:
        print(f"no e-mail would be sent: {err}")
        return 0
    except ValidationError as err:
        print(
            f"pubrelay preview-email: {args.file} is not a webhook body: {validation_line(err)}",
            file=sys.stderr,
        )
        return EXIT_INPUT
    except HandlerError as err:
        print(f"pubrelay preview-email: {args.file}: {err}", file=sys.stderr)
        return EXIT_INPUT
    if args.raw:
        sys.stdout.buffer.write(message.as_bytes(policy=email.policy.SMTP))
    else:
        print(format_preview(message), end="")
    return 0
