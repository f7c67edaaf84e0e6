"""The README documents every setting the code reads and every option the CLI takes: the
configuration table is generated from the settings classes, and the command table lists
what ``--help`` lists."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

from pubrelay.cli import build_parser
from pubrelay.settings import describe_settings
from pubrelay.settings_catalog import builtin_sections
from pubrelay.settings_table import undocumented, updated

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_environment_variable_is_in_the_readme_configuration() -> None:
    text = README.read_text()
    names = [name for name, _, _ in describe_settings()]
    names += [name for section in builtin_sections() for name in section.variables]
    missing = [name for name in names if f"`{name}`" not in text]
    assert missing == []


def test_the_readme_configuration_table_is_generated_from_the_settings_classes() -> None:
    text = README.read_text()
    assert updated(text) == text, "README.md's configuration table is stale: run `make docs`"


def test_every_setting_says_what_it_means() -> None:
    assert undocumented() == [], "give these fields a description= (the README's meaning)"


def test_readme_names_the_two_commands() -> None:
    text = README.read_text()
    assert "make run" in text
    assert "make test" in text


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command and sub-command parser, by its words after ``pubrelay``."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {
        flag
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for flag in action.option_strings
        if flag.startswith("--")
    }


def is_leaf(parser: argparse.ArgumentParser) -> bool:
    return not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def readme_command_rows() -> dict[tuple[str, ...], set[str]]:
    """The README's command table: each command's words and the options its rows show."""
    section = README.read_text().split("## Command line", 1)[1].split("\n## ", 1)[0]
    rows: dict[tuple[str, ...], set[str]] = {}
    for cell in re.findall(r"^\| `pubrelay ([^`]*)` \|", section, flags=re.MULTILINE):
        words = tuple(w for w in cell.split() if re.fullmatch(r"[a-z][a-z-]*", w))
        rows.setdefault(words, set()).update(re.findall(r"--[a-z][a-z-]*", cell))
    return rows


def test_the_readme_and_help_list_the_same_commands_and_options() -> None:
    readme = readme_command_rows()
    parsed = {path: options(p) for path, p in commands(build_parser()) if is_leaf(p) or not path}
    assert sorted(readme) == sorted(parsed)
    for path, flags in parsed.items():
        assert readme[path] == flags, f"pubrelay {' '.join(path)}"


def test_every_option_and_argument_has_help() -> None:
    bare = [
        f"pubrelay {' '.join(path)} {action.option_strings or action.dest}"
        for path, parser in commands(build_parser())
        for action in parser._actions
        if not action.help and not isinstance(action, argparse._SubParsersAction)
    ]
    assert bare == []
