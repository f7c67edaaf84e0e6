"""Lone surrogate escapes in JSON text: replaced, and nothing else touched."""

from __future__ import annotations

import json

import msgspec
import pytest

from schemas.envelope import decode_lean
from schemas.surrogates import without_lone_surrogates


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r'"\ud83d"', r'"\ufffd"'),
        (r'"\uD83D x"', r'"\ufffd x"'),
        (r'"x \ude00"', r'"x \ufffd"'),
        (r'"\ud83d\ud83d\ude00"', r'"\ufffd\ud83d\ude00"'),
        (r'"\ude00\ud83d"', r'"\ufffd\ufffd"'),
        (r'"\\\ud83d"', r'"\\\ufffd"'),  # an escaped backslash, then a lone surrogate
    ],
)
def test_lone_surrogates_are_replaced(text: str, expected: str) -> None:
    fixed = without_lone_surrogates(text)
    assert fixed == expected
    assert json.loads(fixed) == json.loads(expected)
    msgspec.json.decode(fixed)  # what msgspec refused, it now reads


@pytest.mark.parametrize(
    "text",
    [
        r'"\ud83d\ude00"',  # a pair: one character
        r'"\\ud83d"',  # an escaped backslash followed by the letters "ud83d"
        r'"\u00e9 \n"',
        '"plain"',
    ],
)
def test_text_without_lone_surrogates_is_left_alone(text: str) -> None:
    assert without_lone_surrogates(text) is None
    assert without_lone_surrogates(text.encode()) is None


def test_bytes_that_are_not_utf8_are_left_to_the_decoder() -> None:
    assert without_lone_surrogates(b'"\\ud83d \xff"') is None


def test_the_lean_envelope_of_a_body_with_a_lone_surrogate_is_decoded() -> None:
    body = b'{"id":"whs_1","event":{"id":"ev_1","type":"t"},"data":{"customer":{"id":"c\\ud83d"}}}'

    envelope = decode_lean(body)

    assert envelope.event.id == "ev_1"
    assert envelope.customer_id == "c\ufffd"


def test_the_lean_envelope_still_refuses_what_is_not_json() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_lean(b'{"id":"whs_1","event":{"id":"ev_1","type":"t"},"x":"\\ud83d"')  # cut
    with pytest.raises(msgspec.ValidationError):
        decode_lean(b'{"id":"whs_1","x":"\\ud83d"}')  # no event
