"""Voucherify's published signature test vectors, the whitespace rule, and the bound that
keeps an unauthenticated request cheap."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import re
from typing import Final

import pytest

from consumer.signature import (
    MAX_NORMALISED_BYTES,
    MAX_NORMALISED_TOKENS,
    Verdict,
    Verifier,
    sign,
    strip_json_whitespace,
)

VECTORS = [
    (
        "secret-signature-key",
        b'{"test":"test1"}',
        "5547d4d07430a2d1b77649564c68d80afe591f7cc61ca110bccb442e3205eeec",
    ),
    ("secretKey", b'{"a":1}', "a17d2ac229d1ebbb5f10e839c7985c4818e5986eab297f7e5979196d4d7d3ed2"),
    (
        "secretKey",
        b'{\n  "a": 1\n}',
        "a17d2ac229d1ebbb5f10e839c7985c4818e5986eab297f7e5979196d4d7d3ed2",
    ),
    (
        "secretKey",
        b'{"a\\"b":1}',
        "f7cf97814a03146abedb9793f56e1dec34f618f82d10395310d053f749483ffb",
    ),
]


@pytest.mark.parametrize(("secret", "body", "expected"), VECTORS)
def test_published_vectors_verify(secret: str, body: bytes, expected: str) -> None:
    assert Verifier([secret]).verify(body, expected)


def test_sign_matches_the_compact_vectors() -> None:
    assert sign("secretKey", b'{"a":1}') == VECTORS[1][2]
    assert sign("secret-signature-key", b'{"test":"test1"}') == VECTORS[0][2]


def test_uppercase_hex_signature_is_accepted() -> None:
    assert Verifier(["secretKey"]).verify(b'{"a":1}', VECTORS[1][2].upper())


@pytest.mark.parametrize(
    "signature", [None, "", "zz", VECTORS[1][2][:-2], VECTORS[1][2] + "00", "0" * 64]
)
def test_malformed_or_wrong_signatures_fail(signature: str | None) -> None:
    assert not Verifier(["secretKey"]).verify(b'{"a":1}', signature)


def test_no_secret_configured_never_verifies() -> None:
    verifier = Verifier([])
    assert not verifier.configured
    assert not verifier.verify(b'{"a":1}', sign("", b'{"a":1}'))


def test_whitespace_inside_strings_is_kept() -> None:
    body = b'{ "a b" : "c \\" d\\\\" ,\n\t"e": [1, 2] }'
    assert strip_json_whitespace(body) == b'{"a b":"c \\" d\\\\","e":[1,2]}'


def test_whitespace_inside_strings_changes_the_signature() -> None:
    signed = sign("k", b'{"a":"x y"}')
    assert Verifier(["k"]).verify(b'{ "a" : "x y" }', signed)
    assert not Verifier(["k"]).verify(b'{"a":"xy"}', signed)


def test_any_rotated_secret_verifies() -> None:
    verifier = Verifier(["old", "new"])
    assert verifier.verify(b"{}", sign("old", b"{}"))
    assert verifier.verify(b"{}", sign("new", b"{}"))
    assert not verifier.verify(b"{}", sign("other", b"{}"))


# The rule as a regex, as it was written before the C-speed version: the oracle the
# version in consumer/signature.py must agree with on every JSON-like input.
_ORACLE: Final = re.compile(rb'("(?:[^"\\]|\\.)*+"?)|[ \t\n\r]+', re.DOTALL)


def oracle_strip(body: bytes) -> bytes:
    return _ORACLE.sub(rb"\1", body)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b'{"a":1}',
        b'{ "a" : [ 1 , "x y" ] }\n',
        b'{"a\\\\":" b "}',  # an escaped backslash ends right before the closing quote
        b'{"a\\\\\\"b": " "}',  # escaped backslash, then an escaped quote
        b'{"a": "unclosed string \\" with  spaces',
        b'"\\',  # a string ending in a lone backslash
        b'\t{"\xc3\xa9 \xe2\x82\xac": "\xf0\x9f\x98\x80 x"}\r\n',
    ],
)
def test_whitespace_removal_agrees_with_the_rule_on_tricky_bodies(body: bytes) -> None:
    assert strip_json_whitespace(body) == oracle_strip(body)


def test_whitespace_removal_agrees_with_the_rule_on_random_bodies() -> None:
    # JSON's lexical shape: backslashes only inside strings; the last string may be open.
    rng = random.Random(9)
    outside = [b"{", b"}", b"[", b"]", b",", b":", b"1", b"true", b" ", b"\n", b"\t", b"\r"]
    inside = [b"a", b" ", b"\t", b"\\\\", b'\\"', b"\\n", b"\\u00e9", b"\xc3\xa9"]
    for _ in range(3000):
        tokens = rng.choices(outside, k=rng.randint(0, 12))
        for _ in range(rng.randint(0, 4)):
            string = b"".join(rng.choices(inside, k=rng.randint(0, 6)))
            tokens.insert(rng.randint(0, len(tokens)), b'"' + string + b'"')
        body = b"".join(tokens)
        if rng.random() < 0.1:
            body += b'"' + b"".join(rng.choices(inside, k=3))  # an unclosed string
        assert strip_json_whitespace(body) == oracle_strip(body), body


def pretty_body(strings: int) -> tuple[bytes, bytes]:
    """A pretty-printed JSON object of ``strings`` short strings, and its compact form."""
    value = {f"k{i}": f"v {i}" for i in range(strings // 2)}
    return json.dumps(value, indent=2).encode(), json.dumps(value, separators=(",", ":")).encode()


def test_a_pretty_body_within_the_bound_verifies_over_its_compact_form() -> None:
    pretty, compact = pretty_body(MAX_NORMALISED_TOKENS // 2 - 2)  # two quotes per string
    assert pretty.count(b'"') <= MAX_NORMALISED_TOKENS

    assert Verifier(["k"]).check(pretty, sign("k", compact)) is Verdict.VALID


def test_a_pretty_body_over_the_bound_is_not_normalised_and_fails() -> None:
    pretty, compact = pretty_body(MAX_NORMALISED_TOKENS // 2 + 2)
    verifier = Verifier(["k"])

    assert verifier.check(pretty, sign("k", compact)) is Verdict.NOT_NORMALISED
    assert not verifier.verify(pretty, sign("k", compact))
    # Signed as received, it is valid whatever its size.
    assert verifier.check(pretty, sign("k", pretty)) is Verdict.VALID


@pytest.mark.parametrize(
    "body",
    [b'{"a":"x y"}', b"x" * 1024, b'"\\"' * 10_000],
    ids=["spaces-in-strings-only", "no-whitespace", "escapes-no-whitespace"],
)
def test_a_body_without_whitespace_outside_strings_is_simply_invalid(body: bytes) -> None:
    assert Verifier(["k"]).check(body, "0" * 64) is Verdict.INVALID


def test_a_body_over_the_size_bound_is_not_normalised_however_few_its_quotes() -> None:
    verifier = Verifier(["k"])
    within = b'{"a":' + b" " * (MAX_NORMALISED_BYTES - 8) + b"1}"
    over = b'{"a":' + b" " * MAX_NORMALISED_BYTES + b"1}"
    assert len(within) <= MAX_NORMALISED_BYTES < len(over)

    assert verifier.check(within, sign("k", b'{"a":1}')) is Verdict.VALID
    assert verifier.check(over, sign("k", b'{"a":1}')) is Verdict.NOT_NORMALISED
    assert verifier.check(over, sign("k", over)) is Verdict.VALID


@pytest.mark.parametrize("key_length", [1, 32, 63, 64, 65, 200])
def test_the_check_agrees_with_the_standard_library_hmac_for_any_key_length(
    key_length: int,
) -> None:
    # Verifier computes each key's HMAC pads once (RFC 2104); keys longer than SHA-256's
    # 64-byte block are hashed first, as hmac does.
    secret = "k" * (key_length - 1) + "!"
    for body in (b"", b"{}", bytes(range(256)) * 20):
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert Verifier([secret]).verify(body, expected)
        assert not Verifier([secret + "x"]).verify(body, expected)
