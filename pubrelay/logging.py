"""structlog set up once at the edge: level, ISO UTC time, JSON or console, masking.

Every log line passes :func:`mask_sensitive`, so a customer e-mail address that reaches a
log call anyway is masked (``j***@example.com``), and values of keys that look secret
are replaced. The values of :data:`NOT_ADDRESS_KEYS` are identifiers shaped like an
address (an e-mail's ``Message-ID``, which operators match against the mail server's log)
and are logged as they are.

Libraries (aiokafka, aiohttp) log through the standard library, and some log every failed
attempt: with the broker down, aiokafka wrote about 6,300 ERROR lines in 45 s.
:class:`RepeatLimiter` lets one line per distinct message (logger, level, message
template) through per interval; the next one after the interval carries ``repeated``,
the number of lines left out in between. pubrelay's own lines are not limited: they
come from structlog and keep their own back-off.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import itertools
import json
import logging
import operator
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import IO, Any, Final, Literal

import msgspec
import structlog

from schemas.masking import MAX_MASKED_CHARS, mask_emails
from schemas.timestamps import utc_now_log

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


NOT_ADDRESS_KEYS: Final = frozenset({"message_id"})
"""Log keys whose values look like addresses but are not: pubrelay makes them itself
(``handlers/builtin/email/message.py``: ``<pubrelay.<publication id>@<sender domain>>``)."""


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


# Values that need no masking unless their key looks secret: numbers, flags, and ASCII
# text short enough and without "@" (checked in mask_sensitive).
_PLAIN: Final = frozenset({int, float, bool, type(None)})


@functools.lru_cache(maxsize=256)
def _secret_keys(keys: tuple[str, ...]) -> tuple[str, ...]:
    # A call site logs the same keys every time: one look-up per line, not one per key.
    return tuple(key for key in keys if isinstance(key, str) and _is_secret_key(key))


def mask_sensitive(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask e-mail addresses and secret-looking values."""
    for key, value in event_dict.items():
        kind = type(value)
        if kind is str:
            if value.isascii() and "@" not in value and len(value) <= MAX_MASKED_CHARS:
                continue  # most values: nothing to mask
            if key in NOT_ADDRESS_KEYS:
                event_dict[key] = value.encode("utf-8", "backslashreplace").decode("utf-8")
                continue
        elif kind in _PLAIN:
            continue
        event_dict[key] = _mask(value)
    for key in _secret_keys(tuple(event_dict)):
        event_dict[key] = "***"
    return event_dict


_encoder = msgspec.json.Encoder(enc_hook=str)


def _dumps(obj: Any, **_: Any) -> str:
    # msgspec renders a log line in a fraction of json.dumps's time (one per request).
    try:
        return _encoder.encode(obj).decode()
    except (TypeError, ValueError):  # whatever it cannot encode, a log call must not fail
        return json.dumps(obj, default=repr)


class _Lines:
    """The lines logged during one turn of an event loop, written together when the turn
    ends: one ``write`` per turn instead of one per line (a request or an event logs a
    line each: ``docs/performance.md``). Outside a running loop (a thread, a command, a
    test), a line is written at once, after those waiting. Lines waiting when the
    process exits normally are written then; a process killed outright loses at most
    the lines of its last loop turn."""

    def __init__(self) -> None:
        self._waiting: list[tuple[IO[str], str]] = []
        self._lock = threading.Lock()
        # The loop a flush waits on, and its thread (one attribute: set at once).
        self._flush_on: tuple[asyncio.AbstractEventLoop, int] | None = None
        self._lost = 0  # lines that could not be written, not yet reported

    def add(self, file: IO[str], line: str) -> None:
        with self._lock:
            self._waiting.append((file, line))
        due = self._flush_on
        thread = threading.get_ident()
        if due is not None and due[1] == thread and due[0].is_running():
            # This thread's running loop writes them at the end of its turn. Checked
            # before get_running_loop(), which on Python 3.11 is a getpid() system call.
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if due is None or due[0] is not loop:
            self._flush_on = (loop, thread)
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the waiting lines, one ``write`` per run of lines to the same file. Lines
        that cannot be written (a full disk or quota under the log file, a closed pipe)
        are counted, never raised into the request or the handler that logged them; the
        next flush that writes says how many were lost."""
        with self._lock:
            self._flush_on = None
            waiting, self._waiting = self._waiting, []
            written = True
            for file, run in itertools.groupby(waiting, key=operator.itemgetter(0)):
                lines = [line for _, line in run]
                written = _write(file, lines)
                if not written:
                    self._lost += len(lines)
            lost = self._lost if written else 0
            self._lost -= lost
        if lost:
            structlog.get_logger("pubrelay.logging").warning("log_lines_lost", lines=lost)


def _write(file: IO[str], lines: list[str]) -> bool:
    """Write ``lines``; False when they could not be."""
    try:
        file.write("\n".join(lines) + "\n")
        file.flush()
    except (OSError, ValueError):  # ValueError: the file was closed
        return False
    return True


_LINES: Final = _Lines()
atexit.register(_LINES.flush)


def flush_log_lines() -> None:
    """Write the lines waiting for the end of the loop turn now."""
    _LINES.flush()


class _LineLogger:
    """The logger behind structlog: hands each rendered line to :data:`_LINES`."""

    def __init__(self, file: IO[str]) -> None:
        self._file = file

    def msg(self, message: str) -> None:
        _LINES.add(self._file, message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _FlushingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Library lines, written after pubrelay's own lines waiting: in the order logged."""

    def emit(self, record: logging.LogRecord) -> None:
        _LINES.flush()
        super().emit(record)


def _lean_method(name: str) -> Callable[..., Any]:
    """A log method doing what structlog's does, without its layers of calls and
    keyword copies (a third of a line's cost: ``docs/performance.md``)."""

    def method(self: Any, event: str, *args: Any, **event_kw: Any) -> Any:
        if args:  # "%s" interpolation, as structlog does it (one mapping: by name)
            one = len(args) == 1 and isinstance(args[0], Mapping) and args[0]
            event = event % (args[0] if one else args)
            return self._proxy_to_logger(name, event, **event_kw)
        context = self._context
        event_dict: Any = {**context, **event_kw} if context else event_kw
        event_dict["event"] = event
        logger = self._logger
        try:
            for processor in self._processors:
                event_dict = processor(logger, name, event_dict)
        except structlog.DropEvent:
            return None
        if isinstance(event_dict, str | bytes | bytearray):
            return getattr(logger, name)(event_dict)
        if isinstance(event_dict, tuple):
            args, kwargs = event_dict
            return getattr(logger, name)(*args, **kwargs)
        return getattr(logger, name)(**event_dict)

    method.__name__ = name
    return method


def _wrapper_class(min_level: int) -> type[Any]:
    """structlog's filtering logger for ``min_level``, with lean methods for the levels
    it writes."""
    base = structlog.make_filtering_bound_logger(min_level)
    methods = {
        name: _lean_method(name)
        for level, name in ((10, "debug"), (20, "info"), (30, "warning"), (40, "error"))
        if level >= min_level
    }
    if "warning" in methods:
        methods["warn"] = methods["warning"]
    if "info" in methods:
        methods["msg"] = methods["info"]
    return type("PubrelayLogger", (base,), methods)


LIBRARY_REPEAT_INTERVAL_S: Final = 30.0
_MAX_DISTINCT: Final = 1024


class RepeatLimiter(logging.Filter):
    """One record per distinct library message per ``interval_s``, with a repeat count."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        # (logger, level, template) -> (when its last line was let through, left out since)
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "pubrelay" or record.name.startswith("pubrelay."):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if last is None and len(self._seen) >= _MAX_DISTINCT:
            self._forget_older_than(now - self.interval_s)
        self._seen[key] = (now, 0)
        if last is not None and last[1]:
            record.pubrelay_repeated = last[1]
        return True

    def _forget_older_than(self, when: float) -> None:
        self._seen = {k: v for k, v in self._seen.items() if v[0] >= when and not v[1]}
        if len(self._seen) >= _MAX_DISTINCT:  # a flood of distinct messages: start over
            self._seen.clear()


def _add_repeated(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Library lines: how many lines of the same message :class:`RepeatLimiter` left out."""
    record = event_dict.get("_record")
    repeated = getattr(record, "pubrelay_repeated", None)
    if repeated:
        event_dict["repeated"] = repeated
    return event_dict


def _add_timestamp(
    _: Any, __: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """ISO 8601 UTC with microseconds, as structlog's ``TimeStamper(fmt="iso", utc=True)``
    writes it, with the date and time to the second formatted once per second."""
    event_dict["timestamp"] = utc_now_log()
    return event_dict


_SHARED_PROCESSORS: Final[tuple[structlog.typing.Processor, ...]] = (
    # No contextvars merge: pubrelay binds none, and merging walks every context variable
    # of the task for every line.
    structlog.processors.add_log_level,
    _add_timestamp,
    # Tracebacks become text before masking, so addresses in them are masked too.
    structlog.processors.format_exc_info,
    mask_sensitive,
)
"""The processors before the renderer: the console format's and the library lines';
:func:`_json_line` runs the same steps in one call (``tests/unit/test_log_line.py``
holds the two to the same lines)."""

_LEVEL_OF_METHOD: Final = {"warn": "warning", "exception": "error"}
"""The level of a log method whose name is not its level (as ``add_log_level`` maps them)."""


def _json_line(_: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
    """The JSON format's processors in one call, in their order: the level
    (``add_log_level``), the timestamp, a traceback as text (``format_exc_info``), the
    masking, the rendering. One call instead of five (and the renderer's keyword copy):
    the intake writes a line per request (docs/performance.md, "The request line")."""
    event_dict["level"] = _LEVEL_OF_METHOD.get(method_name, method_name)
    event_dict["timestamp"] = utc_now_log()
    if "exc_info" in event_dict:
        event_dict = structlog.processors.format_exc_info(_, method_name, event_dict)
    return _dumps(mask_sensitive(_, method_name, event_dict))


@dataclass(frozen=True, slots=True)
class _JsonFormat:
    """:func:`configure_logging`'s JSON format, for :func:`log_line`."""

    processors: list[Any]  # the list given to structlog: in force while structlog holds it
    min_level: int
    file: IO[str]


_json_format: _JsonFormat | None = None

_LEVELS: Final = {name.lower(): number for name, number in logging.getLevelNamesMapping().items()}
"""The standard library's levels by method name, the numbers ``configure_logging`` reads."""


def log_line(method_name: str, event: str, fields: dict[str, Any]) -> bool:
    """Write the line ``<logger>.<method_name>(event, **fields)`` writes in
    :func:`configure_logging`'s JSON format (the same processors: masking included),
    without structlog's calls around them; ``fields`` is used up. The intake writes a line
    per request, and those calls were a third of the line's cost (docs/performance.md,
    "The request line").

    False, with nothing written, when another configuration is in force (the console
    format, a test capturing lines, structlog reset or configured anew): the caller logs
    through structlog then."""
    json_format = _json_format
    if json_format is None:
        return False
    processors = json_format.processors
    if (
        structlog.get_config()["processors"] is not processors
        or len(processors) != 1
        or processors[0] is not _json_line
    ):
        return False
    level = _LEVELS.get(_LEVEL_OF_METHOD.get(method_name, method_name), logging.CRITICAL)
    if level >= json_format.min_level:
        fields["event"] = event
        _LINES.add(json_format.file, _json_line(None, method_name, fields))
    return True


def configure_logging(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    *,
    library_repeat_interval_s: float = LIBRARY_REPEAT_INTERVAL_S,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Configure structlog (and the standard library's root logger) once per process."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer()
        if use_console
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    global _json_format  # noqa: PLW0603 - one logging configuration per process
    processors: list[Any] = [*_SHARED_PROCESSORS, renderer] if use_console else [_json_line]
    structlog.configure(
        processors=processors,
        wrapper_class=_wrapper_class(numeric),
        logger_factory=lambda *_: _LineLogger(sys.stderr),
        cache_logger_on_first_use=True,
    )
    _json_format = None if use_console else _JsonFormat(processors, numeric, sys.stderr)
    # Libraries (aiohttp, aiokafka) log through the standard library: rendered by the same
    # processors (JSON stays JSON), at WARNING or above unless debugging.
    handler = _FlushingHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                _add_repeated,
                *_SHARED_PROCESSORS,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    handler.addFilter(RepeatLimiter(library_repeat_interval_s, clock))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING) if numeric > logging.DEBUG else logging.DEBUG)
    # aiokafka's connections log every request at DEBUG, a SASL PLAIN password inside
    # the authentication request's bytes: never below INFO, whatever the level.
    logging.getLogger("aiokafka.conn").setLevel(logging.INFO)
