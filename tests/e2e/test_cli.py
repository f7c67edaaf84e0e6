"""The CLI as a user runs it: `pubrelay serve`, `send`, `sign`, configuration errors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import urllib.request
from pathlib import Path

from bus.sqlite import SqliteBus
from consumer.signature import sign
from schemas.record import header
from tests.fixtures.app import EXAMPLE, read_topic
from tests.fixtures.process import Launcher, pubrelay_bin

SAMPLE = EXAMPLE / "customer.publication.succeeded.json"


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [pubrelay_bin(), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_serve_generates_a_private_secret_and_accepts_a_sent_event(
    run_pubrelay: Launcher, tmp_path: Path
) -> None:
    server = run_pubrelay(["serve"])
    server.wait_ready()

    secret_file = tmp_path / "var" / "webhook-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert str(secret_file) in server.output()
    assert "PUBRELAY_WEBHOOK__SECRETS" in server.output()

    sent = run_cli("send", str(SAMPLE), "--url", f"{server.url}/webhooks/voucherify", cwd=tmp_path)
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.startswith("202 accepted")

    signed = run_cli("sign", str(SAMPLE), cwd=tmp_path)
    secret = secret_file.read_text().strip()
    assert signed.stdout.strip() == sign(secret, SAMPLE.read_bytes())

    assert server.terminate() == 0
    log_lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    [request] = [line for line in log_lines if line.get("event") == "webhook_request"]
    assert request["outcome"] == "accepted"
    assert request["event_id"] == "evcus_0e16e42bc6e0c65b58"
    assert "jack.webhook@example.com" not in server.output()

    async def stored() -> list[bytes | None]:
        bus = SqliteBus(tmp_path / "var" / "bus.sqlite3")
        await bus.start()
        try:
            records = await read_topic(bus, "voucherify.customer.publication.succeeded")
        finally:
            await bus.close()
        return [header(r.headers, "event-id") for r in records]

    assert asyncio.run(stored()) == [b"evcus_0e16e42bc6e0c65b58"]


def test_second_start_reuses_the_generated_secret(run_pubrelay: Launcher, tmp_path: Path) -> None:
    first = run_pubrelay(["webhook"])
    first.wait_ready()
    secret = (tmp_path / "var" / "webhook-secret").read_text()
    assert first.terminate() == 0
    second = run_pubrelay(["webhook"])
    second.wait_ready()
    assert (tmp_path / "var" / "webhook-secret").read_text() == secret
    assert "generated a webhook secret" not in second.output()


def test_configured_secret_rejects_other_signatures(run_pubrelay: Launcher, tmp_path: Path) -> None:
    server = run_pubrelay(["webhook"], env={"PUBRELAY_WEBHOOK__SECRETS": '["configured"]'})
    server.wait_ready()
    assert not (tmp_path / "var" / "webhook-secret").exists()
    url = f"{server.url}/webhooks/voucherify"
    ok = run_cli(
        "send",
        str(SAMPLE),
        "--url",
        url,
        cwd=tmp_path,
        env={"PUBRELAY_WEBHOOK__SECRETS": '["configured"]'},
    )
    assert ok.stdout.startswith("202")
    bad = run_cli(
        "send",
        str(SAMPLE),
        "--url",
        url,
        cwd=tmp_path,
        env={"PUBRELAY_WEBHOOK__SECRETS": '["other"]'},
    )
    assert bad.returncode == 1
    assert bad.stdout.startswith("401")


def test_sigterm_stops_serve_cleanly(run_pubrelay: Launcher) -> None:
    server = run_pubrelay(["serve"])
    server.wait_ready()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0
    events = [json.loads(line)["event"] for line in server.output().splitlines() if line[:1] == "{"]
    assert events[-2:] == ["stopping", "stopped"]


def test_invalid_configuration_stops_start_up_naming_the_setting(tmp_path: Path) -> None:
    result = run_cli("serve", cwd=tmp_path, env={"PUBRELAY_HTTP__PORT": "not-a-port"})
    assert result.returncode == 2
    assert "PUBRELAY_HTTP__PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_sign_without_any_secret_says_how_to_configure_one(tmp_path: Path) -> None:
    result = run_cli("sign", str(SAMPLE), cwd=tmp_path)
    assert result.returncode == 2
    assert "PUBRELAY_WEBHOOK__SECRETS" in result.stderr


def test_send_to_a_closed_port_fails_with_a_message(tmp_path: Path) -> None:
    env = {"PUBRELAY_WEBHOOK__SECRETS": '["s"]'}
    result = run_cli("send", str(SAMPLE), "--url", "http://127.0.0.1:9/x", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "127.0.0.1:9" in result.stderr
    assert "nothing answers there" in result.stderr
    assert "is `pubrelay serve` (or `webhook`) running" in result.stderr


def test_send_to_a_server_that_never_answers_names_the_timeout(tmp_path: Path) -> None:
    """A timeout has no text of its own: the line ended after the URL."""
    env = {"PUBRELAY_WEBHOOK__SECRETS": '["s"]'}
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/x"
        result = run_cli(
            "send", str(SAMPLE), "--url", url, "--timeout", "0.5", cwd=tmp_path, env=env
        )
    assert result.returncode == 1
    assert result.stderr.strip() == f"pubrelay send: {url}: no answer within 0.5 s (--timeout)"


def test_preview_email_prints_the_message_the_email_handler_would_send(tmp_path: Path) -> None:
    env = {"PUBRELAY_EMAIL__SENDER": "Shop <coupons@shop.example>"}
    result = run_cli("preview-email", str(SAMPLE), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "To: Jack Webhook <jack.webhook@example.com>" in result.stdout
    assert "Subject: Your coupon code SPRING-2024-tPz" in result.stdout
    assert "--- text/plain ---" in result.stdout
    assert "--- text/html ---" in result.stdout
    assert "10% off" in result.stdout


def test_preview_email_says_why_nothing_would_be_sent(tmp_path: Path) -> None:
    envelope = json.loads(SAMPLE.read_bytes())
    envelope["data"]["customer"]["metadata"]["email_opt_out"] = "yes"
    opted_out = tmp_path / "opted-out.json"
    opted_out.write_text(json.dumps(envelope))
    env = {"PUBRELAY_EMAIL__SENDER": "Shop <coupons@shop.example>"}
    result = run_cli("preview-email", str(opted_out), cwd=tmp_path, env=env)
    assert result.returncode == 0
    assert result.stdout.startswith("no e-mail would be sent")


def test_unknown_handler_stops_start_up_listing_the_installed_ones(tmp_path: Path) -> None:
    env = {"PUBRELAY_HANDLERS__ENABLED": '["nope"]', "PUBRELAY_HTTP__PORT": "0"}
    result = run_cli("serve", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "nope" in result.stderr
    assert "email" in result.stderr  # the installed handlers are listed
    assert "Traceback" not in result.stderr


def test_worker_process_serves_health_and_metrics_and_stops_on_sigterm(
    run_pubrelay: Launcher,
) -> None:
    worker = run_pubrelay(["worker"], env={"PUBRELAY_HANDLERS__ENABLED": '["noop"]'})
    worker.wait_ready()
    with urllib.request.urlopen(f"{worker.url}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    assert 'pubrelay_handler_events_total{handler="noop",outcome="handled"} 0.0' in metrics
    with urllib.request.urlopen(f"{worker.url}/readyz", timeout=5) as response:
        assert response.status == 200
    assert worker.terminate() == 0


def test_an_empty_secret_is_refused_not_used(tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "webhook-secret").write_text("\n")
    result = run_cli("sign", str(SAMPLE), cwd=tmp_path)
    assert result.returncode == 2
    assert "empty" in result.stderr
    configured_empty = run_cli(
        "sign", str(SAMPLE), cwd=tmp_path, env={"PUBRELAY_WEBHOOK__SECRETS": '["ok", " "]'}
    )
    assert configured_empty.returncode == 2
    assert "PUBRELAY_WEBHOOK__SECRETS" in configured_empty.stderr


def test_an_unwritable_data_directory_is_a_clear_configuration_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the data directory should be")
    result = run_cli(
        "serve",
        cwd=tmp_path,
        env={"PUBRELAY_DATA_DIR": str(blocker / "var"), "PUBRELAY_HTTP__PORT": "0"},
    )
    assert result.returncode == 2
    assert "not-a-directory" in result.stderr
    assert "Traceback" not in result.stderr
