"""The console's gate: the token in constant time, stateless sessions that expire and die
with the token, CSRF tokens bound to the session, failed guesses slowed in bounded memory."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr, ValidationError

from pubrelay.console.auth import MAX_FAILING, Gate, TooManyFailures, safe_next
from pubrelay.console.config import ConsoleSettings
from pubrelay.console.fields import _read_any as read_any
from pubrelay.console.fields import read_fields
from tests.fixtures.app import EXAMPLE


async def test_the_right_token_passes_and_a_wrong_one_is_answered_after_the_delay() -> None:
    gate = Gate("right-token", session_ttl_s=60, failure_delay_s=0.05)
    assert await gate.check_token("right-token")
    assert not await gate.check_token("wrong-token")
    assert not await gate.check_token("")


async def test_more_concurrent_failures_than_the_slots_are_refused_without_checking() -> None:
    gate = Gate("right-token", session_ttl_s=60, failure_delay_s=0.3)
    results = await asyncio.gather(
        *(gate.check_token(f"guess-{n}") for n in range(MAX_FAILING + 3)),
        return_exceptions=True,
    )
    assert results.count(False) == MAX_FAILING
    assert sum(isinstance(r, TooManyFailures) for r in results) == 3
    assert await gate.check_token("right-token")  # the right token is never held back


def test_a_session_expires_and_a_new_token_ends_every_session() -> None:
    gate = Gate("token-a", session_ttl_s=60)
    session = gate.new_session(now=1000.0)
    assert gate.session_valid(session, now=1059.0)
    assert not gate.session_valid(session, now=1061.0)
    assert not Gate("token-b", session_ttl_s=60).session_valid(session, now=1001.0)
    expiry, _, mac = session.partition(".")
    assert not gate.session_valid(f"{int(expiry) + 9999}.{mac}", now=1001.0)  # forged expiry
    assert not gate.session_valid("garbage", now=1001.0)


def test_the_csrf_token_is_bound_to_the_session() -> None:
    gate = Gate("token-a", session_ttl_s=60)
    one, two = gate.new_session(now=1.0), gate.new_session(now=2.0)
    assert gate.csrf_valid(one, gate.csrf_token(one))
    assert not gate.csrf_valid(two, gate.csrf_token(one))
    assert not gate.csrf_valid(one, "")


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/console/events?q=x", "/console/events?q=x"),
        ("https://evil.example/", "/console/"),
        ("//evil.example/console/", "/console/"),
        ("/console//evil.example", "/console/"),
        ("/console/\\evil", "/console/"),
        ("/console/\r\nSet-Cookie: x=1", "/console/"),  # no header can be injected
        ("/console/\t/evil.example", "/console/"),
        (None, "/console/"),
    ],
)
def test_after_login_only_console_paths_are_followed(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def test_the_search_fields_come_from_the_body_and_every_code_is_a_term() -> None:
    body = (
        b'{"data": {"customer": {"id": "cust_1", "email": "A@B.example", "source_id": "src"},'
        b' "campaign": {"name": "Spring"}, "publication": {"id": "pub_1", "channel": "api",'
        b' "voucher": {"code": "ONE"}, "vouchers": [{"code": "TWO"}, {"code": 3}, "x"]}}}'
    )
    fields, terms = read_fields(body)
    assert (fields.customer_email, fields.voucher_code, fields.campaign) == (
        "A@B.example",
        "ONE",
        "Spring",
    )
    assert terms == {"cust_1", "a@b.example", "pub_1", "one", "two"}
    assert read_fields(b"[1, 2]") == read_fields(b"not json") == read_fields(b"[" * 100_000)
    example = (EXAMPLE / "customer.publication.succeeded.json").read_bytes()
    assert read_fields(example) == read_any(example)  # msgspec's fast path reads the same
    assert read_fields(example)[0].voucher_code == "SPRING-2024-tPz"


async def test_a_token_or_cookie_that_is_not_utf_8_is_refused_not_an_error() -> None:
    """aiohttp decodes such header bytes to surrogates (``b"\\xff"`` -> ``"\\udcff"``)."""
    gate = Gate("token-a", session_ttl_s=60, failure_delay_s=0.01)
    assert await gate.check_token("\udcff\udcfe") is False
    assert gate.session_valid("99999999999.\udcff") is False
    assert gate.csrf_valid(gate.new_session(), "\udcff") is False


@pytest.mark.parametrize(
    "token", ["abc", "short-token-15c", " " * 40, "  fifteen chars  ", "a b c d e f g h i j k"]
)
def test_a_token_that_could_be_guessed_is_refused_at_start(token: str) -> None:
    with pytest.raises(ValidationError, match="at least 16 characters"):
        ConsoleSettings(token=SecretStr(token))


def test_a_token_of_sixteen_characters_or_none_is_accepted() -> None:
    assert ConsoleSettings(token=SecretStr("0123456789abcdef")).enabled
    assert not ConsoleSettings().enabled


def test_a_logged_out_session_is_refused_and_others_live_on() -> None:
    gate = Gate("token-a", session_ttl_s=60)
    mine, other = gate.new_session(now=1000.0), gate.new_session(now=1000.0)
    assert mine != other  # two logins in the same second are two sessions
    gate.end_session(mine, now=1001.0)
    assert not gate.session_valid(mine, now=1002.0)
    assert gate.session_valid(other, now=1002.0)
