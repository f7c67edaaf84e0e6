"""Text from signed bodies, made safe where the console and the CLI put it: a URL's path
segment, and a terminal."""

from __future__ import annotations

import pytest

from pubrelay.console.app import path_segment
from pubrelay.text import clip, for_terminal, printable


@pytest.mark.parametrize(
    ("value", "segment"),
    [
        ("evt_123", "evt_123"),
        ("evt/with/slashes", "evt%2Fwith%2Fslashes"),
        ("a?b#c d", "a%3Fb%23c%20d"),
        ("..", "%2E%2E"),
        (".", "%2E"),
        ("v1.2", "v1.2"),
    ],
)
def test_an_id_is_one_path_segment(value: str, segment: str) -> None:
    assert path_segment(value) == segment


def test_a_terminal_gets_no_control_character_from_an_event() -> None:
    line = printable("evt_\x1b]0;pwned\x07  CODE\x1b[2J  é")
    assert line == "evt_\\x1b]0;pwned\\x07  CODE\\x1b[2J  é"
    assert line.isprintable()


def test_a_cut_counts_what_the_terminal_shows() -> None:
    shown = for_terminal("\x1b[2J" + "x" * 40, 12)
    assert shown == "\\x1b[2Jxxxx…"
    assert (len(shown), shown.isprintable()) == (12, True)
    assert for_terminal(None) == ""
    assert for_terminal("line one\nline two\r") == "line one\\nline two\\r"


@pytest.mark.parametrize(
    ("text", "width", "shown"),
    [("abc", 3, "abc"), ("abcd", 3, "ab…"), ("", 1, ""), ("ab", 1, "…")],
)
def test_clip_keeps_what_fits_and_marks_a_cut(text: str, width: int, shown: str) -> None:
    assert clip(text, width) == shown
