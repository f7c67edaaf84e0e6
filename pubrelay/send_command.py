"""``pubrelay send``: sign a body and POST it, telling the truth about the answer.

It posts to the configured intake (``PUBRELAY_HTTP__HOST``, ``PORT``, ``PUBRELAY_WEBHOOK__PATH``)
unless ``--url`` says otherwise, refuses a file that is not JSON before sending, prints
the answer's state (``202 accepted``, ``202 quarantined: stale``) and exits 1 for
anything but ``accepted`` (``--allow-quarantined``: any 2xx). ``--example [NAME]`` sends a
fresh copy of a built-in sample (``schemas/examples/``) with new delivery, event and
publication ids and times of now, so trying the pipeline twice shows two effects rather
than a duplicate.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path
from typing import Any, Final

from aiohttp import ClientConnectorError, ClientError, ClientSession, ClientTimeout

from consumer.signature import sign
from pubrelay.exit_codes import EXIT_CONFIG
from pubrelay.secrets import resolve_secrets
from pubrelay.settings import Settings
from schemas.record import HEADER_SIGNATURE
from schemas.timestamps import utc_now_iso

EXAMPLES: Final = Path(__file__).resolve().parents[1] / "schemas" / "examples"
DEFAULT_EXAMPLE: Final = "customer.publication.succeeded"


def example_names() -> list[str]:
    return sorted(p.stem for p in EXAMPLES.glob("*.json"))


def default_url(settings: Settings) -> str:
    """The intake this configuration serves (a wildcard address is reached on loopback)."""
    host = settings.http.host
    if host in ("", "0.0.0.0"):  # noqa: S104 - reading the setting, not binding
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.http.port}{settings.webhook.path}"


def _fresh_id(old: object, fallback_prefix: str) -> str:
    prefix = old.split("_", 1)[0] if isinstance(old, str) and "_" in old else fallback_prefix
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def fresh_example(name: str) -> tuple[bytes, dict[str, Any]]:
    """A copy of sample ``name`` with new ids and times of now, and the envelope."""
    path = EXAMPLES / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"no example {name!r}; built-in examples: {', '.join(example_names())}")
    envelope: dict[str, Any] = json.loads(path.read_bytes())
    now = utc_now_iso()
    envelope["id"] = _fresh_id(envelope.get("id"), "whs")
    envelope["created_at"] = now
    event = envelope.setdefault("event", {})
    event["id"] = _fresh_id(event.get("id"), "ev")
    event["created_at"] = now
    publication = envelope.get("data", {}).get("publication")
    if isinstance(publication, dict):
        publication["id"] = _fresh_id(publication.get("id"), "pub")
        publication["created_at"] = now
    return json.dumps(envelope, indent=2).encode(), envelope


def _read_body(args: argparse.Namespace) -> bytes | str:
    """The body to send, or the one-line reason it cannot be sent."""
    if (args.file is None) == (args.example is None):
        return "give a FILE or --example [NAME] (not both)"
    if args.example is not None:
        body, envelope = fresh_example(args.example)
        publication = envelope.get("data", {}).get("publication") or {}
        print(
            f"example {args.example}: event {envelope['event']['id']}"
            + (f", publication {publication['id']}" if publication.get("id") else ""),
            file=sys.stderr,
        )
        return body
    body = Path(args.file).read_bytes()
    try:
        json.loads(body)
    except (UnicodeDecodeError, ValueError) as err:
        return f"{args.file} is not JSON ({err}); nothing was sent"
    return body


def _state(status: int, reason: str, text: str) -> str:
    """``202 accepted``, ``202 quarantined: stale``, ``401 unauthorized: …``."""
    try:
        answer = json.loads(text)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("status"), str):
        return f"{status} {reason}"
    detail = answer.get("reason") or (answer.get("message") if status >= 300 else None)
    return f"{status} {answer['status']}" + (f": {detail}" if detail else "")


async def _post(url: str, body: bytes, signature: str, timeout_s: float) -> tuple[int, str, str]:
    async with (
        ClientSession(timeout=ClientTimeout(total=timeout_s)) as session,
        session.post(
            url,
            data=body,
            headers={"Content-Type": "application/json", HEADER_SIGNATURE: signature},
        ) as response,
    ):
        return response.status, response.reason or "", await response.text()


async def send(settings: Settings, args: argparse.Namespace) -> int:
    body = _read_body(args)
    if isinstance(body, str):  # nothing to send: the input's fault, as a missing FILE is
        print(f"pubrelay send: {body}", file=sys.stderr)
        return EXIT_CONFIG
    url = args.url or default_url(settings)
    signature = sign(resolve_secrets(settings, generate=False)[0], body)
    try:
        status, reason, text = await _post(url, body, signature, args.timeout)
    except ClientConnectorError as err:
        print(
            f"pubrelay send: {url}: nothing answers there ({err.os_error.strerror or err}): "
            "is `pubrelay serve` (or `webhook`) running, on PUBRELAY_HTTP__PORT? (--url to "
            "send elsewhere)",
            file=sys.stderr,
        )
        return 1
    except TimeoutError:
        print(
            f"pubrelay send: {url}: no answer within {args.timeout:g} s (--timeout)",
            file=sys.stderr,
        )
        return 1
    except ClientError as err:
        print(f"pubrelay send: {url}: {str(err) or type(err).__name__}", file=sys.stderr)
        return 1
    state = _state(status, reason, text)
    print(state)
    if state == f"{status} accepted" or (args.allow_quarantined and 200 <= status < 300):
        return 0
    return 1
