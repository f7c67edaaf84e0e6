"""``make run``'s command as a user runs it (``pubrelay serve --console --outbox``, nothing
configured): a sample sent with ``pubrelay send --example`` ends as an e-mail in the outbox,
and ``pubrelay events CODE`` finds the event with the ``email`` handler's outcome."""

from __future__ import annotations

import json
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.process import Launcher, pubrelay_bin

CODE = "SPRING-2024-tPz"  # the example's code (schemas/examples/)


def cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [pubrelay_bin(), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_make_run_takes_a_sample_to_the_outbox_and_the_event_index(
    tmp_path: Path, run_pubrelay: Launcher
) -> None:
    process = run_pubrelay(["serve", "--console", "--outbox"])
    process.wait_ready()
    env = {"PATH": "/usr/bin:/bin", "PUBRELAY_HTTP__PORT": str(process.port)}
    sent = cli("send", "--example", cwd=tmp_path, env=env)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    outbox = tmp_path / "var" / "outbox"
    found: dict[str, object] = {}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        listed = cli("events", CODE.lower(), "--json", cwd=tmp_path, env=env)
        events = json.loads(listed.stdout)["events"] if listed.returncode == 0 else []
        if events and events[0]["handlers"].get("email") == "done":
            found = events[0]
            break
        time.sleep(0.2)
    assert found, process.output()
    assert found["voucher_code"] == CODE
    mails = list(outbox.glob("*.eml"))
    assert len(mails) == 1
    assert stat.S_IMODE(mails[0].stat().st_mode) == 0o600
    assert CODE in mails[0].read_text()
    table = cli("events", CODE, cwd=tmp_path, env=env)
    assert "email: done" in table.stdout
    assert "jack.webhook@example.com" not in table.stdout  # masked in the table
    nothing = cli("events", "no-such-code", cwd=tmp_path, env=env)
    assert nothing.returncode == 1
    assert process.terminate() == 0
    [defaults] = [
        json.loads(line) for line in process.output().splitlines() if "outbox_defaults" in line
    ]
    assert defaults["applied"] == [
        'PUBRELAY_HANDLERS__ENABLED=["email"]',
        "PUBRELAY_EMAIL__SMTP_URL=outbox:",
        "PUBRELAY_EMAIL__SENDER=Your Shop <s***@example.com>",  # masked as every address
    ]


def test_outbox_mode_never_lends_its_placeholder_sender_to_a_real_relay(
    run_pubrelay: Launcher,
) -> None:
    # A relay configured in .env with no sender: customers must not get mail from the
    # placeholder; the e-mail handler asks for a sender instead.
    process = run_pubrelay(
        ["serve", "--outbox"], env={"PUBRELAY_EMAIL__SMTP_URL": "smtp://127.0.0.1:2525"}
    )
    try:
        code = process.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve is still running:\n{process.output()}")
    assert code == 2
    assert "PUBRELAY_EMAIL__SENDER" in process.output()
    assert "Your Shop" not in process.output()
