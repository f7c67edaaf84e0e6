"""Voucherify's published signature test vectors and the whitespace rule."""

from __future__ import annotations

import pytest

from consumer.signature import Verifier, sign, strip_json_whitespace

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
