"""structlog set up once at the edge: level, ISO UTC time, JSON or console, masking.

Every log line passes :func:`mask_sensitive`, so a customer e-mail address that reaches a
log call anyway is masked (``j***@example.com``), and values of keys that look secret
are replaced.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final, Literal

import msgspec
import structlog

from schemas.masking import mask_emails

_SECRET_KEYS: Final = (
    "secret",
    "password",
    "passwd",
    "token",
    "authorization",
    "api_key",
    "apikey",
    "credential",
    "signature_key",
    "cookie",
)


@functools.lru_cache(maxsize=1024)
def _is_secret_key(key: str) -> bool:
    # Cached: log keys are a small fixed set, and this runs for every key of every line.
    lowered = key.lower()
    return any(word in lowered for word in _SECRET_KEYS)


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        if not value.isascii():  # O(1) for the usual ASCII value
            # Lone surrogates (a hostile header, JSON "\ud83d") must not break logging.
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
        return mask_emails(value)
    if isinstance(value, BaseException):
        return _mask(f"{type(value).__name__}: {value}")
    if isinstance(value, dict):
        return {
            k: "***" if isinstance(k, str) and _is_secret_key(k) else _mask(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_mask(v) for v in value]
    return value


def mask_sensitive(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask e-mail addresses and secret-looking values."""
    for key, value in event_dict.items():
        if _is_secret_key(key):
            event_dict[key] = "***"
        else:
            event_dict[key] = _mask(value)
    return event_dict


_encoder = msgspec.json.Encoder(enc_hook=str)


def _dumps(obj: Any, **_: Any) -> str:
    # msgspec renders a log line in a fraction of json.dumps's time (one per request).
    try:
        return _encoder.encode(obj).decode()
    except (TypeError, ValueError):  # whatever it cannot encode, a log call must not fail
        return json.dumps(obj, default=repr)


class _LineLogger(structlog.PrintLogger):
    """Prints each line; a line that cannot be written (a full disk or quota under the log
    file, a closed pipe) is counted, never raised into the request or the handler that
    logged it. The next line written says how many were lost."""

    lost = 0  # per process

    def msg(self, message: str) -> None:
        try:
            super().msg(message)
        except OSError:
            _LineLogger.lost += 1
            return
        if _LineLogger.lost:
            lost, _LineLogger.lost = _LineLogger.lost, 0
            structlog.get_logger("pubrelay.logging").warning("log_lines_lost", lines=lost)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def configure_logging(
    level: str = "info", fmt: Literal["auto", "json", "console"] = "auto"
) -> None:
    """Configure structlog (and the standard library's root logger) once per process."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer()
        if use_console
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        # Tracebacks become text before masking, so addresses in them are masked too.
        structlog.processors.format_exc_info,
        mask_sensitive,
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: _LineLogger(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries (aiohttp, aiokafka) log through the standard library: rendered by the same
    # processors (JSON stays JSON), at WARNING or above unless debugging.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING) if numeric > logging.DEBUG else logging.DEBUG)
