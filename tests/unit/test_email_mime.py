"""The e-mail's bytes built directly (handlers/builtin/email/mime.py) are the bytes
``email.message`` builds: ``EmailMessage`` with the same headers, ``set_content(text)``,
``add_alternative(html, subtype="html")``, flattened with ``as_bytes(policy=SMTP)``."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

import pytest

from handlers.builtin.email.mime import fold_header, header_line, multipart_alternative

TEMPLATES = Path(__file__).resolve().parents[2] / "handlers/builtin/email/templates"
HeaderValue = str | Address


def reference(headers: list[tuple[str, HeaderValue]], text: str, html: str) -> bytes:
    """The message as the e-mail handler built it before (email.message)."""
    message = EmailMessage()
    for name, value in headers:
        message[name] = value
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message.as_bytes(policy=policy.SMTP)


def direct(headers: list[tuple[str, HeaderValue]], text: str, html: str) -> bytes:
    return multipart_alternative([header_line(n, v) for n, v in headers], text, html)


def same_bytes(headers: list[tuple[str, HeaderValue]], text: str, html: str) -> None:
    for seed in range(3):  # the same random boundary on both sides
        random.seed(seed)
        expected = reference(headers, text, html)
        random.seed(seed)
        assert direct(headers, text, html) == expected


def usual_headers(
    name: str = "Jack Webhook", subject: str = "Your code SPRING-001"
) -> list[tuple[str, HeaderValue]]:
    return [
        ("From", "Spring Shop <coupons@shop.example>"),
        ("To", Address(display_name=name, addr_spec="customer1@example.com")),
        ("Reply-To", "help@shop.example"),
        ("Subject", subject),
        ("Date", "Wed, 01 May 2024 12:00:01 +0000"),
        ("Message-ID", "<pubrelay.pub_0a402d9f07a7bb2c19f5fb54c90fa520@shop.example>"),
        ("Auto-Submitted", "auto-generated"),
        ("X-Pubrelay-Event-Id", "evcus_1"),
    ]


def test_the_builtin_templates_message_is_byte_for_byte_the_email_package_s() -> None:
    text = (TEMPLATES / "default.txt").read_text()
    html = (TEMPLATES / "default.html").read_text()
    same_bytes(usual_headers(), text, html)


@pytest.mark.parametrize(
    ("text", "html"),
    [
        ("short\n", "<p>short</p>\n"),
        ("", ""),
        ("no newline at the end", "<p>x</p>"),
        ("Grüße, Jürgen\nÀ bientôt\n", "<p>Grüße</p>\n"),  # 8bit
        ("x" * 79 + "\n", "<p>" + "y" * 200 + "</p>\n"),  # quoted-printable
        ("\n".join(["line " * 20] * 30), "<p>\n" * 40),  # qp, more than ten lines
        ("日本語のテキスト" * 20 + "\n", "<p>" + "日本語" * 40 + "</p>\n"),  # base64
        ("crlf\r\nlines\rand\nmore\r\n", "<p>a =3D b, tab\tend </p>\n"),
        ("--===============0000000000000000000==\n", "<p>boundary-like</p>\n"),
        ("From the start\n.\n..\n", "<p>dots</p>\n"),
    ],
)
def test_bodies_are_encoded_as_set_content_encodes_them(text: str, html: str) -> None:
    same_bytes(usual_headers(), text, html)


@pytest.mark.parametrize(
    "headers",
    [
        usual_headers(name=""),
        usual_headers(name="Jack W. Smith"),
        usual_headers(name='Jack "the coupon" O\'Brien'),
        usual_headers(name="Jürgen Müller"),
        usual_headers(name="A very long customer name that goes on and on " * 3),
        usual_headers(subject="Ihr Gutschein für den Frühling"),
        usual_headers(subject="A subject well beyond the seventy-eight characters of a line " * 2),
        usual_headers(subject="=?utf-8?q?looks_encoded?="),
        [
            *usual_headers(),
            ("List-Unsubscribe", "<https://shop.example/u?c=cust_1>, <mailto:u@shop.example>"),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ],
        [*usual_headers(), ("List-Unsubscribe", "<https://shop.example/u?c=x>")],
    ],
)
def test_headers_are_folded_as_the_smtp_policy_folds_them(
    headers: list[tuple[str, HeaderValue]],
) -> None:
    same_bytes(headers, "text\n", "<p>html</p>\n")


def test_a_part_holding_the_boundary_gets_the_boundary_the_generator_gives() -> None:
    random.seed(11)
    boundary = "=" * 15 + f"{random.randrange(sys.maxsize):019d}" + "=="
    text = f"before\n--{boundary}\nafter\n--{boundary}.0--\n"
    random.seed(11)
    expected = reference(usual_headers(), text, "<p>html</p>\n")
    random.seed(11)
    assert direct(usual_headers(), text, "<p>html</p>\n") == expected


ALPHABET = 'aZ09 ."()<>@,;:\\=?-_~/é\t' + "x" * 10


@pytest.mark.parametrize("name", ["Subject", "To", "X-Pubrelay-Event-Id", "List-Unsubscribe"])
def test_a_header_written_without_parsing_is_what_folding_gives(name: str) -> None:
    rng = random.Random(name)
    for _ in range(120 if name == "To" else 600):  # parsing odd addresses is slow
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(0, 90)))
        if name == "To":
            value: HeaderValue = Address(display_name=text, addr_spec="c.1@example.com")
        else:
            value = text.strip() or "x"
        assert header_line(name, value) == fold_header(name, value), repr(value)


def folded(write: Callable[[str, HeaderValue], bytes], name: str, value: HeaderValue) -> str:
    """The header's bytes, or the exception writing it raised (the same either way)."""
    try:
        return repr(write(name, value))
    except Exception as err:  # the stdlib raises odd types (AttributeError) on odd values
        return repr(err)


def test_odd_addresses_and_message_ids_are_folded_by_the_standard_library() -> None:
    rng = random.Random(3)
    for _ in range(800):
        domain = "".join(rng.choice("ab0.-[]_:") for _ in range(rng.randrange(1, 20)))
        ident = "".join(rng.choice("aZ09._-") for _ in range(rng.randrange(1, 40)))
        value = f"<pubrelay.{ident}@{domain}>"
        expected = folded(fold_header, "Message-ID", value)
        assert folded(header_line, "Message-ID", value) == expected, value
    for _ in range(300):
        name = "".join(rng.choice('aZ "().,:;@<>\\') for _ in range(rng.randrange(0, 30)))
        local = "".join(rng.choice('aZ0._+-"!#') for _ in range(rng.randrange(1, 12)))
        domain = "".join(rng.choice("ab0.-[]") for _ in range(rng.randrange(1, 12)))
        try:
            to = Address(display_name=name, username=local, domain=domain)
        except ValueError:
            continue
        assert folded(header_line, "To", to) == folded(fold_header, "To", to), repr(to)


def test_message_ids_and_dates_written_without_parsing_are_what_folding_gives() -> None:
    rng = random.Random(7)
    for _ in range(500):
        ident = "".join(rng.choice("aZ09._-") for _ in range(rng.randrange(1, 70)))
        value = f"<pubrelay.{ident}@shop.example>"
        assert header_line("Message-ID", value) == fold_header("Message-ID", value), value
    when = format_datetime(random_moment(rng))
    assert header_line("Date", when) == fold_header("Date", when)


def random_moment(rng: random.Random) -> datetime:
    return datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(10**8))


def test_the_message_parses_back_to_its_parts() -> None:
    raw = direct(usual_headers(name="Jürgen"), "Grüße\n", "<p>" + "y" * 200 + "</p>\n")
    parsed = message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed["To"] == "Jürgen <customer1@example.com>"
    text = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert text is not None
    assert html is not None
    assert text.get_content() == "Grüße\r\n"  # the line ends as sent
    assert html.get_content() == "<p>" + "y" * 200 + "</p>\r\n"
    assert not parsed.defects
