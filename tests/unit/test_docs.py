"""The README documents every setting the code reads."""

from __future__ import annotations

from pathlib import Path

from pubrelay.settings import describe_settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_environment_variable_is_in_the_readme_configuration() -> None:
    text = README.read_text()
    missing = [name for name, _, _ in describe_settings() if f"`{name}`" not in text]
    assert missing == []


def test_readme_names_the_two_commands() -> None:
    text = README.read_text()
    assert "make run" in text
    assert "make test" in text
