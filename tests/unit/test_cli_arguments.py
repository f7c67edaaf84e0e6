"""Arguments the command line can check alone are refused before anything runs, with an
example of a good value (argparse's exit 2)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pubrelay.cli import build_parser


@pytest.mark.parametrize(
    "argv",
    [
        ["replay", "--handler", "email", "--since", "yesterday"],
        ["reconcile", "--since", "last week"],
    ],
)
def test_a_since_that_is_no_time_is_refused_with_an_example(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)

    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "argument --since:" in error
    assert "is not an ISO 8601 time; e.g. 2026-12-01T08:00:00+00:00" in error


def test_a_since_is_read_as_the_time_it_names() -> None:
    args = build_parser().parse_args(
        ["replay", "--handler", "email", "--since", "2026-12-01T08:00:00+00:00"]
    )
    assert args.since == datetime(2026, 12, 1, 8, tzinfo=UTC)


@pytest.mark.parametrize("command", [["events", "x"], ["quarantine", "list"], ["dlq", "list"]])
@pytest.mark.parametrize("limit", ["0", "-1", "ten"])
def test_a_limit_below_one_is_refused(
    command: list[str], limit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*command, "--limit", limit]
    if command[0] == "dlq":
        argv += ["--handler", "email"]
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)

    assert exited.value.code == 2
    assert f"argument --limit: {limit!r} is not a whole number of at least 1" in (
        capsys.readouterr().err
    )
