"""The operator commands as a user runs them: what `dlq list`, `replay`, `quarantine`, `send`
and `preview-email` print and exit with."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from bus.pending import SMALL_BATCH_RECORDS
from bus.sqlite import SqliteBus
from handlers.worker.dead_letters import dead_letter_headers
from pubrelay.exit_codes import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED
from schemas.record import (
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_ORIGIN,
    HEADER_QUARANTINE_DETAIL,
    HEADER_QUARANTINE_REASON,
    header,
)
from tests.fixtures.app import EXAMPLE, read_topic
from tests.fixtures.process import Launcher, pubrelay_bin
from tests.fixtures.smtp import SmtpServer

SAMPLE = EXAMPLE / "customer.publication.succeeded.json"  # created in 2024
SAMPLE_EVENT_ID = "evcus_0e16e42bc6e0c65b58"
SECRET_ENV = {"PUBRELAY_WEBHOOK__SECRETS": '["operator-secret"]'}
TOPIC = "voucherify.customer.publication.succeeded"
LONG_ERROR = "SMTPRecipientRefused: 550 5.1.1 " + "the mailbox is unavailable; " * 8 + "END"


def cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [pubrelay_bin(), *args],
        cwd=cwd,
        env={**os.environ, "PUBRELAY_LOG__LEVEL": "warning", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def seed_dead_letters(
    bus_path: Path,
    count: int,
    *,
    event_id: str = "evcus_dead_",
    error: str = LONG_ERROR,
    body: bytes = b"{}",
) -> None:
    async def seed() -> None:
        bus = SqliteBus(bus_path)
        await bus.start()
        try:
            for n in range(count):
                original = (
                    (HEADER_EVENT_ID, f"{event_id}{n}".encode()),
                    (HEADER_EVENT_TYPE, b"customer.publication.succeeded"),
                )
                headers = dead_letter_headers(
                    original,
                    error=error,
                    error_type="aiosmtplib.errors.SMTPRecipientRefused",
                    attempts=1,
                    first_failed_at="2026-12-01T10:00:00.000+00:00",
                    last_failed_at="2026-12-01T10:00:00.000+00:00",
                    handler="email",
                    source_topic=TOPIC,
                )
                await bus.publish("voucherify.dlq.email", body, key=b"c", headers=headers)
        finally:
            await bus.close()

    asyncio.run(seed())


def test_dlq_list_and_replay_say_what_they_read_and_what_they_would_send(tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    seed_dead_letters(tmp_path / "var" / "bus.sqlite3", 3)

    listing = cli("dlq", "list", "--handler", "email", "--limit", "2", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    first = listing.stdout.splitlines()[0]
    assert "sqlite:///var/bus.sqlite3" in first
    assert "topic voucherify.dlq.email" in first
    assert "2 of 3 dead letter(s) waiting for handler 'email'" in listing.stdout
    assert "END" not in listing.stdout  # the error is cut to the table's width

    full = cli("dlq", "list", "--handler", "email", "--full", cwd=tmp_path)
    assert "END" in full.stdout
    assert "3 dead letter(s) waiting" in full.stdout

    as_json = cli("dlq", "list", "--handler", "email", "--json", "--limit", "1", cwd=tmp_path)
    document = json.loads(as_json.stdout)
    assert (document["topic"], document["total"], document["shown"]) == (
        "voucherify.dlq.email",
        3,
        1,
    )
    assert document["dead_letters"][0]["event_id"] == "evcus_dead_0"
    assert document["dead_letters"][0]["error"] == LONG_ERROR

    dry = cli("replay", "--handler", "email", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "topic voucherify.dlq.email" in dry.stdout.splitlines()[0]
    for n in range(3):
        assert f"would replay evcus_dead_{n}" in dry.stdout
    assert (
        "3 dead letter(s) waiting" in cli("dlq", "list", "--handler", "email", cwd=tmp_path).stdout
    )


def test_a_replay_that_cannot_finish_says_which_partition_is_left_and_exits_1(
    tmp_path: Path,
) -> None:
    """Dead letters gone between the replay's two readings (retention, say): it sends what
    it still finds, names the partition it could not finish, and exits 1 so a script
    notices; run again, it finds nothing left and exits 0."""
    bus_path = tmp_path / "var" / "bus.sqlite3"
    bus_path.parent.mkdir()
    seed_dead_letters(bus_path, SMALL_BATCH_RECORDS + 5)
    with closing(sqlite3.connect(bus_path)) as conn, conn:
        # The first replayed record expires every dead letter, as retention would: the
        # second reading has its first fetch and finds nothing after it.
        conn.execute(
            "CREATE TRIGGER expire AFTER INSERT ON log WHEN NEW.topic = 'voucherify.retry.email' "
            "BEGIN DELETE FROM log WHERE topic = 'voucherify.dlq.email'; END"
        )

    cut = cli("replay", "--handler", "email", cwd=tmp_path)
    assert cut.returncode == 1, cut.stdout + cut.stderr
    count = SMALL_BATCH_RECORDS
    assert f"replayed {count} of {count} dead letter(s) for handler 'email'" in cut.stdout
    assert "replay ended before the last dead letter waiting at its start" in cut.stderr
    assert "voucherify.dlq.email[0]: run it again" in cut.stderr
    assert f"replayed evcus_dead_{count - 1}\n" in cut.stdout
    assert f"evcus_dead_{count}\n" not in cut.stdout
    with closing(sqlite3.connect(bus_path)) as conn:
        retried = conn.execute(
            "SELECT count(*) FROM log WHERE topic = 'voucherify.retry.email'"
        ).fetchone()
    assert retried == (count,)

    again = cli("replay", "--handler", "email", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "replayed 0 of 0 dead letter(s)" in again.stdout


def test_a_listing_whose_reader_leaves_early_ends_quietly(tmp_path: Path) -> None:
    """`pubrelay dlq list | head`: no traceback, no "Broken pipe" error, the exit code of a
    command SIGPIPE ended (141), as `ls | head` gives."""
    bus_path = tmp_path / "var" / "bus.sqlite3"
    bus_path.parent.mkdir()
    seed_dead_letters(bus_path, 2000)  # ~400 KB of table: more than a pipe holds
    listing = subprocess.Popen(
        [pubrelay_bin(), "dlq", "list", "--handler", "email", "--full"],
        cwd=tmp_path,
        env={**os.environ, "PUBRELAY_LOG__LEVEL": "warning"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert listing.stdout is not None
    assert listing.stderr is not None
    first = listing.stdout.readline()
    listing.stdout.close()  # as `head -1` does
    assert listing.wait(timeout=60) == EXIT_BROKEN_PIPE
    assert b"topic voucherify.dlq.email" in first
    assert listing.stderr.read() == b""
    listing.stderr.close()


def test_a_replay_stopped_with_ctrl_c_keeps_what_it_sent_and_the_next_one_finishes(
    tmp_path: Path,
) -> None:
    """Ctrl-C: one line and exit 130, no traceback; what it sent is committed, so the next
    replay sends the rest and every dead letter is back on the retry topic (one may be
    there twice: sent as the interrupt came, before its commit)."""
    bus_path = tmp_path / "var" / "bus.sqlite3"
    bus_path.parent.mkdir()
    count = 4000  # the replay takes seconds: the interrupt comes in the middle
    seed_dead_letters(bus_path, count)
    replaying = subprocess.Popen(
        [pubrelay_bin(), "replay", "--handler", "email"],
        cwd=tmp_path,
        env={**os.environ, "PUBRELAY_LOG__LEVEL": "warning"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    def retried() -> tuple[int, int]:
        with closing(sqlite3.connect(bus_path, timeout=10)) as conn:
            found: tuple[int, int] = conn.execute(
                "SELECT count(*), count(DISTINCT headers) FROM log WHERE topic = ?",
                ("voucherify.retry.email",),
            ).fetchone()
        return found

    deadline = time.monotonic() + 60
    while retried()[0] < 100:  # sending, past its first reading
        assert replaying.poll() is None, "the replay ended before it was interrupted"
        assert time.monotonic() < deadline, "the replay sent nothing within 60 s"
        time.sleep(0.05)
    replaying.send_signal(signal.SIGINT)
    _, err = replaying.communicate(timeout=60)
    assert replaying.returncode == EXIT_INTERRUPTED, err
    assert err.decode().strip().splitlines()[-1] == "pubrelay: interrupted"
    assert b"Traceback" not in err
    sent_before, _ = retried()
    assert 100 <= sent_before < count

    again = cli("replay", "--handler", "email", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    rest = int(again.stdout.rsplit("replayed ", 1)[1].split()[0])
    assert count - sent_before <= rest <= count - sent_before + 1  # not sent again
    total, distinct = retried()
    assert distinct == count  # every dead letter (their headers differ by event id)
    assert total == sent_before + rest
    left = cli("dlq", "list", "--handler", "email", cwd=tmp_path)
    assert "0 dead letter(s) waiting" in left.stdout


HOSTILE = "evt_\x1b]0;pwned\x07\x1b[2J\r"
SHOWN = "evt_\\x1b]0;pwned\\x07\\x1b[2J\\r"


def test_ids_and_errors_from_events_reach_the_terminal_escaped(tmp_path: Path) -> None:
    """Ids, errors and quarantine details come from signed bodies and exceptions: no
    command lets their control characters act on the operator's terminal."""
    bus_path = tmp_path / "var" / "bus.sqlite3"
    bus_path.parent.mkdir()
    seed_dead_letters(bus_path, 1, event_id=HOSTILE, error=f"refused {HOSTILE}\nline two")

    async def quarantine() -> None:
        bus = SqliteBus(bus_path)
        await bus.start()
        try:
            headers = (
                (HEADER_QUARANTINE_REASON, HOSTILE.encode()),
                (HEADER_QUARANTINE_DETAIL, f"detail {HOSTILE}".encode()),
                (HEADER_EVENT_ID, HOSTILE.encode()),
                (HEADER_EVENT_TYPE, HOSTILE.encode()),
            )
            await bus.publish("voucherify.quarantine", b"{}", key=b"q", headers=headers)
        finally:
            await bus.close()

    asyncio.run(quarantine())
    runs = {
        "dlq list": cli("dlq", "list", "--handler", "email", cwd=tmp_path),
        "dlq list --full": cli("dlq", "list", "--handler", "email", "--full", cwd=tmp_path),
        "replay --dry-run": cli("replay", "--handler", "email", "--dry-run", cwd=tmp_path),
        "quarantine list": cli("quarantine", "list", cwd=tmp_path),
        "quarantine list --full": cli("quarantine", "list", "--full", cwd=tmp_path),
        "quarantine release": cli("quarantine", "release", "--all", "--dry-run", cwd=tmp_path),
    }
    for name, run in runs.items():
        assert "\x1b" not in run.stdout + run.stderr, name
        assert "\x07" not in run.stdout + run.stderr, name
        assert SHOWN[:20] in run.stdout, (name, run.stdout)
    shown_line = SHOWN.removesuffix("\\r")  # --full splits the error at its line ends
    assert f"    refused {shown_line}\n    line two\n" in runs["dlq list --full"].stdout
    assert f"would replay {SHOWN}0" in runs["replay --dry-run"].stdout
    assert f"detail {SHOWN}" in runs["quarantine list --full"].stdout
    assert f"still quarantined {SHOWN}: " in runs["quarantine release"].stdout


BIG_BODY_BYTES = 900 * 1024
BIG_RECORDS = 160  # 140 MiB in each topic


def peak_rss_mib(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run the CLI under a small Python parent that reports its child's peak RSS."""
    probe = (
        "import resource, subprocess, sys; "
        "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stdout.write(done.stdout); sys.stderr.write(done.stderr); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
        "sys.exit(done.returncode)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, pubrelay_bin(), *args],
        cwd=cwd,
        env={**os.environ, "PUBRELAY_LOG__LEVEL": "warning"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    *err, peak_kib = done.stderr.splitlines()
    done.stderr = "\n".join(err)
    return done, int(peak_kib) / 1024


def test_listing_and_releasing_do_not_hold_every_body_waiting(tmp_path: Path) -> None:
    """The CLI reads dead letters and quarantined records a small fetch at a time and
    keeps what it shows without bodies: 140 MiB waiting in each topic does not become
    140 MiB in the process."""
    bus_path = tmp_path / "var" / "bus.sqlite3"
    bus_path.parent.mkdir()
    seed_dead_letters(bus_path, BIG_RECORDS, body=b"x" * BIG_BODY_BYTES)

    async def quarantine() -> None:
        bus = SqliteBus(bus_path)
        await bus.start()
        try:
            for n in range(BIG_RECORDS):
                headers = (
                    (HEADER_QUARANTINE_REASON, b"not_json"),
                    (HEADER_QUARANTINE_DETAIL, b"not JSON"),
                    (HEADER_EVENT_ID, f"evt_big_{n}".encode()),
                )
                body = b"y" * BIG_BODY_BYTES
                await bus.publish("voucherify.quarantine", body, key=b"q", headers=headers)
        finally:
            await bus.close()

    asyncio.run(quarantine())
    empty, baseline = peak_rss_mib("dlq", "list", "--handler", "crm", cwd=tmp_path)
    assert "0 dead letter(s) waiting" in empty.stdout, empty.stdout + empty.stderr
    runs = {
        "dlq list": peak_rss_mib("dlq", "list", "--handler", "email", "--limit", "5", cwd=tmp_path),
        "quarantine list": peak_rss_mib("quarantine", "list", "--limit", "5", cwd=tmp_path),
        "quarantine release": peak_rss_mib(
            "quarantine", "release", "--event-id", "evt_big_150", cwd=tmp_path
        ),
        "replay": peak_rss_mib("replay", "--handler", "email", cwd=tmp_path),
    }
    dlq, _ = runs["dlq list"]
    assert f"5 of {BIG_RECORDS} dead letter(s) waiting" in dlq.stdout, dlq.stdout + dlq.stderr
    listing, _ = runs["quarantine list"]
    assert f"5 of {BIG_RECORDS} quarantined record(s) waiting" in listing.stdout
    assert str(BIG_BODY_BYTES) in listing.stdout.splitlines()[2]  # the body's size, kept
    released, _ = runs["quarantine release"]
    assert "still quarantined evt_big_150: not_json" in released.stdout, released.stdout
    assert f"of {BIG_RECORDS} record(s) waiting" in released.stdout
    replayed, _ = runs["replay"]
    assert f"replayed {BIG_RECORDS} of {BIG_RECORDS} dead letter(s)" in replayed.stdout, (
        replayed.stdout + replayed.stderr
    )
    assert (
        "0 dead letter(s) waiting" in cli("dlq", "list", "--handler", "email", cwd=tmp_path).stdout
    )
    grown = {name: round(peak - baseline) for name, (_, peak) in runs.items()}
    # One fetch of 32 records is 28 MiB; all of them would be 140.
    assert all(mib < 90 for mib in grown.values()), (baseline, grown)


def test_an_unknown_handler_or_a_missing_bus_is_an_error_not_an_empty_list(
    tmp_path: Path,
) -> None:
    unknown = cli("dlq", "list", "--handler", "emial", cwd=tmp_path)
    assert unknown.returncode == 2
    assert "unknown handler 'emial'" in unknown.stderr
    assert "email" in unknown.stderr.split("known handlers:")[1]

    for args in (("dlq", "list", "--handler", "email"), ("replay", "--handler", "email")):
        missing = cli(*args, cwd=tmp_path)
        assert missing.returncode == 2
        assert "no embedded bus" in missing.stderr
        assert str(tmp_path / "var" / "bus.sqlite3") in missing.stderr
    assert not (tmp_path / "var" / "bus.sqlite3").exists()

    quarantine = cli("quarantine", "list", cwd=tmp_path)
    assert quarantine.returncode == 2
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("list", "--reason", "bogus"), "--reason bogus: not a quarantine reason (one of not_utf8"),
        (("release", "--reason", "stael"), "--reason stael: not a quarantine reason"),
        (("release", "--event-id", "x", "--all"), "--all chooses every record waiting"),
        (("release",), "choose what to release: --event-id ID, --reason REASON, or --all"),
    ],
)
def test_a_quarantine_selection_that_cannot_mean_anything_is_refused_before_the_bus(
    tmp_path: Path, args: tuple[str, ...], said: str
) -> None:
    refused = cli("quarantine", *args, cwd=tmp_path)
    assert refused.returncode == 2
    assert said in refused.stderr
    assert not (tmp_path / "var").exists()  # refused before looking for a bus


def test_a_stale_event_is_quarantined_listed_and_released_once_the_age_limit_allows_it(
    run_pubrelay: Launcher, tmp_path: Path
) -> None:
    strict = {**SECRET_ENV, "PUBRELAY_WEBHOOK__MAX_EVENT_AGE_S": "3600"}
    server = run_pubrelay(["webhook"], env=strict)
    server.wait_ready()
    to_server = {**strict, "PUBRELAY_HTTP__PORT": str(server.port)}  # no --url: configured

    bad = tmp_path / "bad.json"
    bad.write_text('{"event": ')
    refused = cli("send", str(bad), cwd=tmp_path, env=to_server)
    assert refused.returncode == 2  # the input's fault, as a missing file is
    assert "bad.json is not JSON" in refused.stderr
    assert "nothing was sent" in refused.stderr

    stale = cli("send", str(SAMPLE), cwd=tmp_path, env=to_server)
    assert stale.stdout.strip() == "202 quarantined: stale"
    assert stale.returncode == 1
    allowed = cli("send", str(SAMPLE), "--allow-quarantined", cwd=tmp_path, env=to_server)
    assert allowed.returncode == 0
    fresh = cli("send", "--example", cwd=tmp_path, env=to_server)
    assert (fresh.returncode, fresh.stdout.strip()) == (0, "202 accepted")
    assert server.terminate() == 0
    assert server.output().count('"webhook_request"') == 3  # the bad file never left

    listing = cli("quarantine", "list", cwd=tmp_path)
    assert "topic voucherify.quarantine" in listing.stdout.splitlines()[0]
    rows = [line for line in listing.stdout.splitlines() if SAMPLE_EVENT_ID in line]
    assert len(rows) == 2
    assert rows[0].startswith("stale")
    assert str(len(SAMPLE.read_bytes())) in rows[0]
    assert "2 quarantined record(s) waiting" in listing.stdout

    still = cli("quarantine", "release", "--event-id", SAMPLE_EVENT_ID, cwd=tmp_path, env=strict)
    assert still.returncode == 1
    assert f"still quarantined {SAMPLE_EVENT_ID}: stale" in still.stdout

    dry = cli("quarantine", "release", "--event-id", SAMPLE_EVENT_ID, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert f"would release {SAMPLE_EVENT_ID}" in dry.stdout
    assert stored_sample_events(tmp_path) == []

    done = cli("quarantine", "release", "--event-id", SAMPLE_EVENT_ID, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"released {SAMPLE_EVENT_ID} (customer.publication.succeeded, was stale)" in done.stdout
    assert stored_sample_events(tmp_path) == [b"quarantine-release"] * 2
    assert "0 quarantined record(s) waiting" in cli("quarantine", "list", cwd=tmp_path).stdout
    again = cli("quarantine", "release", "--all", cwd=tmp_path)
    assert "released 0" in again.stdout
    gone = cli("quarantine", "release", "--event-id", SAMPLE_EVENT_ID, cwd=tmp_path)
    assert gone.returncode == 1
    assert f"not waiting in quarantine: {SAMPLE_EVENT_ID}" in gone.stdout
    assert len(stored_sample_events(tmp_path)) == 2


def stored_sample_events(cwd: Path) -> list[bytes | None]:
    """The ``origin`` header of every record of the sample's event on its topic."""

    async def read() -> list[bytes | None]:
        bus = SqliteBus(cwd / "var" / "bus.sqlite3")
        await bus.start()
        try:
            records = await read_topic(bus, TOPIC)
        finally:
            await bus.close()
        return [
            header(r.headers, HEADER_ORIGIN)
            for r in records
            if header(r.headers, HEADER_EVENT_ID) == SAMPLE_EVENT_ID.encode()
        ]

    return asyncio.run(read())


def eventually(predicate: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_sending_the_example_twice_mails_twice_and_logs_each_message_id_unmasked(
    run_pubrelay: Launcher, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    env = {
        **SECRET_ENV,
        "PUBRELAY_HANDLERS__ENABLED": '["email"]',
        "PUBRELAY_EMAIL__SMTP_URL": smtp_server.url,
        "PUBRELAY_EMAIL__SENDER": "Shop <coupons@shop.example>",
    }
    server = run_pubrelay(["serve"], env=env)
    server.wait_ready()
    to_server = {**SECRET_ENV, "PUBRELAY_HTTP__PORT": str(server.port)}
    for _ in range(2):
        sent = cli("send", "--example", cwd=tmp_path, env=to_server)
        assert (sent.returncode, sent.stdout.strip()) == (0, "202 accepted"), sent.stderr
        assert "example customer.publication.succeeded: event evcus_" in sent.stderr
    eventually(lambda: len(smtp_server.mailbox) == 2, "two e-mails")
    eventually(lambda: server.output().count('"email_sent"') == 2, "two email_sent lines")
    assert server.terminate() == 0

    message_ids = {m.message["Message-ID"] for m in smtp_server.mailbox}
    assert len(message_ids) == 2  # two publications, not one and a duplicate
    logged = {
        json.loads(line)["message_id"]
        for line in server.output().splitlines()
        if '"email_sent"' in line
    }
    assert logged == message_ids


def test_preview_email_without_a_sender_uses_a_placeholder_and_says_so(tmp_path: Path) -> None:
    result = cli("preview-email", str(SAMPLE), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "From: Your Shop <shop@example.com>" in result.stdout
    assert "PUBRELAY_EMAIL__SENDER is not set" in result.stderr
    assert "placeholder" in result.stderr


def test_preview_email_input_errors_are_one_line_and_exit_1(tmp_path: Path) -> None:
    env = {"PUBRELAY_EMAIL__SENDER": "Shop <coupons@shop.example>"}
    not_a_webhook = tmp_path / "other.json"
    not_a_webhook.write_text('{"hello": "world"}')
    not_json = tmp_path / "broken.json"
    not_json.write_text("{")
    for path in (not_a_webhook, not_json, tmp_path / "missing.json"):
        result = cli("preview-email", str(path), cwd=tmp_path, env=env)
        assert result.returncode == 1, result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith(f"pubrelay preview-email: {path}")
        assert "Traceback" not in result.stderr
        assert "pydantic" not in line
