"""HubSpot's answers read as one outcome per contact (no I/O).

A batch upsert's answer names the contacts it refused by our ``objectWriteTraceId`` (the
input's position) or by id (the e-mail address), in an error's ``context`` or in its
sub-errors'. :func:`multi_status` reads a 207, :func:`attribute` maps any list of errors
to the contacts they name; what :mod:`handlers.builtin.crm.hubspot` does with each status
is described there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from schemas.errors import HandlerError, RetryLater
from schemas.masking import mask_emails

_ID_KEYS: Final = ("ids", "id", "email", "emails", "inputs")
_TRACE_KEYS: Final = ("objectWriteTraceId", "objectWriteTraceIds")


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one contact failed: ``reject`` dead-letters it, ``retry`` retries it
    (``isolate``: alone, on its next attempt)."""

    kind: Literal["reject", "retry"]
    message: str
    delay_s: float | None = None
    isolate: bool = False

    def error(self) -> HandlerError | RetryLater:
        if self.kind == "reject":
            return HandlerError(self.message)
        return RetryLater(self.message, delay_s=self.delay_s)


Contacts = Mapping[str, dict[str, str]]
"""The inputs of one request: each contact's properties by e-mail address, in order."""
Outcomes = dict[str, Failure | None]
"""Each contact's outcome by e-mail address: ``None`` when it was upserted."""


def every(contacts: Iterable[str], failure: Failure | None) -> Outcomes:
    return dict.fromkeys(contacts, failure)


def json_object(text: str) -> dict[str, Any]:
    """HubSpot's JSON answer, or ``{}`` for anything else (a proxy's HTML page...)."""
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def multi_status(contacts: Contacts, body: Mapping[str, Any]) -> Outcomes:
    """A 207: the contacts its errors name are rejected, the others were upserted."""
    errors = body.get("errors")
    named, unnamed = attribute(contacts, errors if isinstance(errors, list) else (), None)
    outcomes = every(contacts, None)
    outcomes.update(named)
    results = body.get("results")
    done = len(results) if isinstance(results, list) else 0
    if unnamed and done + len(named) < len(contacts):
        # Some contact failed without being named: retry the unnamed ones alone
        # (an upsert repeated is harmless), so the culprit is found on its own.
        failure = Failure("retry", unnamed[0], isolate=True)
        for email in contacts:
            if email not in named:
                outcomes[email] = failure
    return outcomes


def attribute(
    contacts: Contacts, errors: Iterable[Any], status: int | None
) -> tuple[dict[str, Failure], list[str]]:
    """Map errors to the contacts they name; the summaries of errors naming none."""
    by_trace = {str(n): email for n, email in enumerate(contacts)}
    named: dict[str, Failure] = {}
    unnamed: list[str] = []
    for error in errors:
        if not isinstance(error, Mapping):
            continue
        summary = "HubSpot rejected the contact: " + error_summary(status, error)
        traces, ids = _targets(error)
        emails = {by_trace[t] for t in traces if t in by_trace} | (ids & contacts.keys())
        if not emails:
            unnamed.append(summary)
        for email in emails:
            named.setdefault(email, Failure("reject", summary))
    return named, unnamed


def _targets(error: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """The trace ids and ids an error names (in its ``context`` or its sub-errors')."""
    traces: set[str] = set()
    ids: set[str] = set()
    contexts: list[Any] = [error.get("context")]
    for sub in error.get("errors") or ():
        if isinstance(sub, Mapping):
            contexts.append(sub.get("context"))
    for context in contexts:
        if not isinstance(context, Mapping):
            continue
        for key in _TRACE_KEYS:
            traces.update(_strings(context.get(key)))
        for key in _ID_KEYS:
            ids.update(s.strip().lower() for s in _strings(context.get(key)))
    if isinstance(error.get("id"), str):
        ids.add(error["id"].strip().lower())
    return traces, ids


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            if isinstance(item, str | int):
                yield str(item)


def error_summary(status: int | None, body: Mapping[str, Any]) -> str:
    """``400 VALIDATION_ERROR: <masked message> (correlationId ...)``, bounded."""
    category = body.get("category") or body.get("errorType") or ""
    message = mask_emails(str(body.get("message") or ""), max_chars=300)
    text = f"{status or ''} {category}".strip()
    if message:
        text += f": {message}"
    correlation = body.get("correlationId")
    if correlation:
        text += f" (correlationId {correlation})"
    return text
