"""`pubrelay config`, `config --check`, `--version` and a mistyped variable, as a user runs
them: what is printed and the exit code."""

from __future__ import annotations

import os
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

from pubrelay.exit_codes import EXIT_CONFIG
from tests.fixtures.process import pubrelay_bin


def run_cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The command with only ``env`` of the PUBRELAY_* variables (and ``cwd``'s ``.env``)."""
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("PUBRELAY_")}
    return subprocess.run(
        [pubrelay_bin(), *args],
        cwd=cwd,
        env={**base, "PUBRELAY_LOG__FORMAT": "json", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def rows(output: str) -> dict[str, tuple[str, str]]:
    """``VARIABLE  FROM  VALUE`` lines by variable."""
    found = {}
    for line in output.splitlines():
        if line.startswith("PUBRELAY_"):
            name, origin, *value = line.split(maxsplit=2)
            found[name] = (origin, value[0] if value else "")
    return found


def test_config_shows_each_value_where_it_came_from_with_secrets_masked(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        'PUBRELAY_WEBHOOK__SECRETS=["whsec-from-dotenv"]\n'
        "PUBRELAY_HTTP__PORT=9000\n"
        "PUBRELAY_CRM__TOKEN=pat-not-enabled\n"
    )
    env = {
        "PUBRELAY_HTTP__PORT": "8181",  # the environment wins over .env
        "PUBRELAY_HANDLERS__ENABLED": '["email"]',
        "PUBRELAY_EMAIL__SENDER": "Shop <coupons@shop.example>",
        "PUBRELAY_EMAIL__PASSWORD": "smtp-password",
        "PUBRELAY_LEDGER__URL": "redis://:redis-password@127.0.0.1:6379/0",
    }
    shown = run_cli("config", cwd=tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr
    table = rows(shown.stdout)
    assert table["PUBRELAY_HTTP__PORT"] == ("environment", "8181")
    assert table["PUBRELAY_WEBHOOK__SECRETS"] == (".env", '["****"]')
    assert table["PUBRELAY_DATA_DIR"] == ("default", "var")
    assert table["PUBRELAY_LEDGER__URL"] == ("environment", "redis://:****@127.0.0.1:6379/0")
    # The enabled handler's own section, as the worker reads it.
    assert "# handlers enabled: email" in shown.stdout
    assert table["PUBRELAY_EMAIL__SENDER"] == ("environment", "Shop <coupons@shop.example>")
    assert table["PUBRELAY_EMAIL__PASSWORD"] == ("environment", "****")
    assert table["PUBRELAY_EMAIL__SMTP_URL"] == ("default", "smtp://localhost:25")
    # A handler that is not enabled: its variable is listed as unused, never its value.
    unused = shown.stdout.split("unused by this configuration", 1)[1]
    assert "PUBRELAY_CRM__TOKEN  .env" in unused
    for secret in ("whsec-from-dotenv", "smtp-password", "redis-password", "pat-not-enabled"):
        assert secret not in shown.stdout + shown.stderr


def test_config_check_passes_a_good_configuration(tmp_path: Path) -> None:
    checked = run_cli(
        "config", "--check", cwd=tmp_path, env={"PUBRELAY_HANDLERS__ENABLED": '["noop"]'}
    )
    assert (checked.returncode, checked.stdout) == (
        0,
        "configuration OK (handlers enabled: noop)\n",
    )


def test_config_check_reports_every_problem_one_line_each_and_fails(tmp_path: Path) -> None:
    env = {
        "PUBRELAY_HTTP__PROT": "8081",
        "PUBRELAY_WEBHOOK__SECRETS": "wrong",
        "PUBRELAY_HANDLERS__ENABLED": '["crm", "email"]',
        "PUBRELAY_EMAIL__SMTP_URL": "smtp://relay:relay-password@127.0.0.1:2525",
    }
    checked = run_cli("config", "--check", cwd=tmp_path, env=env)
    assert checked.returncode == EXIT_CONFIG
    assert checked.stdout == ""
    lines = checked.stderr.splitlines()
    assert (
        lines[0]
        == "pubrelay: PUBRELAY_HTTP__PROT: no such setting; did you mean PUBRELAY_HTTP__PORT?"
    )
    assert lines[1].startswith("pubrelay: PUBRELAY_WEBHOOK__SECRETS=<hidden>: not a JSON list")
    # The handlers are judged too, even with the root settings wrong.
    assert lines[2].startswith("pubrelay: PUBRELAY_CRM__TOKEN is required")
    assert lines[3].startswith("pubrelay: PUBRELAY_EMAIL__SMTP_URL='smtp://relay:****@127.0.0.1")
    assert len(lines) == 4
    assert "relay-password" not in checked.stderr


def test_config_check_refuses_unsafe_acks_the_producer_would_refuse_at_start(
    tmp_path: Path,
) -> None:
    env = {
        "PUBRELAY_BUS__URL": "kafka://127.0.0.1:9",
        "PUBRELAY_BUS__ACKS": "1",
        "PUBRELAY_BUS__ALLOW_UNSAFE_ACKS": "true",
    }
    checked = run_cli("config", "--check", cwd=tmp_path, env=env)
    assert checked.returncode == EXIT_CONFIG, checked.stdout
    assert "PUBRELAY_BUS__ENABLE_IDEMPOTENCE=false" in checked.stderr

    env["PUBRELAY_BUS__ENABLE_IDEMPOTENCE"] = "false"
    checked = run_cli("config", "--check", cwd=tmp_path, env=env)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("configuration OK")


KAFKA = {"PUBRELAY_BUS__URL": "kafka://127.0.0.1:9"}
MAIL = {
    "PUBRELAY_HANDLERS__ENABLED": '["email"]',
    "PUBRELAY_EMAIL__SENDER": "Shop <shop@example.com>",
    "PUBRELAY_EMAIL__SMTP_URL": "smtp://127.0.0.1:2525",
}


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"PUBRELAY_BUS__URL": "kafka://"}, "PUBRELAY_BUS__URL=kafka://: kafka:// needs at least"),
        ({"PUBRELAY_BUS__URL": "sqlite:///"}, "PUBRELAY_BUS__URL=sqlite:///: sqlite:/// needs a"),
        (
            {**KAFKA, "PUBRELAY_BUS__SECURITY_PROTOCOL": "SASL_SSL"},
            "PUBRELAY_BUS__SASL_MECHANISM, PUBRELAY_BUS__SASL_USERNAME and "
            "PUBRELAY_BUS__SASL_PASSWORD are required with PUBRELAY_BUS__SECURITY_PROTOCOL=SASL",
        ),
        (
            {
                **KAFKA,
                "PUBRELAY_BUS__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "PUBRELAY_BUS__SASL_MECHANISM": "PLAIN",
                "PUBRELAY_BUS__SASL_USERNAME": "relay",
            },
            "PUBRELAY_BUS__SASL_PASSWORD is required with",
        ),
        (
            {
                **KAFKA,
                "PUBRELAY_BUS__SECURITY_PROTOCOL": "SSL",
                "PUBRELAY_BUS__SSL_CAFILE": "ca.pem",
            },
            "PUBRELAY_BUS__SSL_CAFILE=ca.pem: no such file",
        ),
        ({"PUBRELAY_HANDLERS__ENABLED": '["noop", "noop"]'}, "listed twice: noop"),
        ({"PUBRELAY_HANDLERS__ENABLED": '["Noop"]'}, "handler name 'Noop' must be lowercase"),
        ({**MAIL, "PUBRELAY_EMAIL__CA_FILE": "relay-ca.pem"}, "relay-ca.pem: no such file"),
        ({"PUBRELAY_WEBHOOK__PATH": "webhooks"}, "PUBRELAY_WEBHOOK__PATH=webhooks: must start"),
        ({"PUBRELAY_WEBHOOK__PATH": "/wébhook"}, "must start with / and hold only printable"),
        ({"PUBRELAY_WEBHOOK__PATH": "/metrics"}, "PUBRELAY_WEBHOOK__PATH=/metrics: is served"),
        (
            {"PUBRELAY_HTTP__BODY_READ_TIMEOUT_S": "3", "PUBRELAY_BUS__PUBLISH_TIMEOUT_S": "7"},
            "plus PUBRELAY_BUS__PUBLISH_TIMEOUT_S=7 must stay under 10 s",
        ),
        ({"PUBRELAY_WEBHOOK__PATH": "/console/login"}, "other than /healthz, /readyz"),
        (
            {"PUBRELAY_LEDGER__URL": "redis://127.0.0.1:abc/0"},
            "not a Redis URL: its port is not a number",
        ),
        ({"PUBRELAY_LEDGER__URL": "sqlite:///"}, "sqlite:/// needs a file path"),
        ({"PUBRELAY_CONSOLE__INDEX_URL": "sqlite:///"}, "sqlite:/// needs a file path"),
        ({"PUBRELAY_CONSOLE__INDEX_URL": "redis://127.0.0.1:6379/0"}, "must be sqlite:///path"),
    ],
)
def test_config_check_refuses_what_start_up_would_refuse(
    tmp_path: Path, env: dict[str, str], said: str
) -> None:
    """Each of these stopped `serve`, `webhook` or `worker` at start while `config --check`
    said "configuration OK": a deploy script's check let them through."""
    checked = run_cli("config", "--check", cwd=tmp_path, env=env)
    assert checked.returncode == EXIT_CONFIG, checked.stdout
    [line] = checked.stderr.splitlines()
    assert said in line


def test_config_check_passes_the_settings_those_refusals_ask_for(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not read by --check\n")
    env = {
        **KAFKA,
        "PUBRELAY_BUS__SECURITY_PROTOCOL": "SASL_SSL",
        "PUBRELAY_BUS__SASL_MECHANISM": "SCRAM-SHA-512",
        "PUBRELAY_BUS__SASL_USERNAME": "relay",
        "PUBRELAY_BUS__SASL_PASSWORD": "relay-password",
        "PUBRELAY_BUS__SSL_CAFILE": "ca.pem",
        "PUBRELAY_BUS__COMPRESSION": "zstd",
        "PUBRELAY_WEBHOOK__PATH": "/hooks/voucherify-v2",
        "PUBRELAY_LEDGER__URL": "redis://127.0.0.1:6379/0",
        "PUBRELAY_CONSOLE__INDEX_URL": "sqlite:///var/index.sqlite3",
        **MAIL,
        "PUBRELAY_EMAIL__CA_FILE": "ca.pem",
    }
    checked = run_cli("config", "--check", cwd=tmp_path, env=env)
    assert (checked.returncode, checked.stdout) == (
        0,
        "configuration OK (handlers enabled: email)\n",
    )


def test_a_mistyped_variable_stops_the_worker_before_it_starts(tmp_path: Path) -> None:
    started = run_cli("worker", cwd=tmp_path, env={"PUBRELAY_HANDLER__ENABLED": '["noop"]'})
    assert started.returncode == EXIT_CONFIG
    assert started.stderr == (
        "pubrelay: PUBRELAY_HANDLER__ENABLED: no such setting; "
        "did you mean PUBRELAY_HANDLERS__ENABLED?\n"
    )
    assert not (tmp_path / "var").exists()  # nothing was created


def test_version_prints_the_installed_version(tmp_path: Path) -> None:
    shown = run_cli("--version", cwd=tmp_path, env={})
    assert (shown.returncode, shown.stdout) == (0, f"pubrelay {version('pubrelay')}\n")
