"""The data directory as a user meets it: one consuming process at a time, private files."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pubrelay.secrets import SECRET_FILE, resolve_secrets
from pubrelay.settings import Settings
from tests.fixtures.app import EXAMPLE, SECRET, event_body, signed_headers
from tests.fixtures.process import Launcher, pubrelay_bin

SAMPLE = EXAMPLE / "customer.publication.succeeded.json"
SIGNED = {"PUBRELAY_WEBHOOK__SECRETS": json.dumps([SECRET])}


@pytest.fixture
def usual_umask() -> Iterator[None]:
    """The common umask 022, under which files are world-readable unless made private."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def post(url: str, body: bytes, secret: str = SECRET) -> int:
    headers = signed_headers(body, secret)
    request = urllib.request.Request(
        f"{url}/webhooks/voucherify", data=body, headers=headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        status: int = response.status
        return status


def test_a_second_serve_on_the_same_data_directory_stops_at_start_with_a_message(
    run_pubrelay: Launcher,
) -> None:
    first = run_pubrelay(["serve"], env=SIGNED)  # no handler enabled: events are stored and wait
    first.wait_ready()
    second = run_pubrelay(["serve"], env=SIGNED)  # the same working directory, so the same ./var
    try:
        code = second.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the second serve is still running:\n{second.output()}")
    assert code == 2
    message = second.output()
    assert f"pid {first.proc.pid}" in message
    assert "already runs the worker on the embedded bus" in message
    assert "Traceback" not in message
    assert first.proc.poll() is None
    assert post(first.url, event_body()) == 202
    assert first.terminate() == 0
    [idle] = [
        json.loads(line) for line in first.output().splitlines() if "worker_no_handlers" in line
    ]
    assert "set PUBRELAY_HANDLERS__ENABLED" in idle["hint"]


def test_webhook_processes_may_run_beside_serve_on_one_data_directory(
    run_pubrelay: Launcher,
) -> None:
    serve = run_pubrelay(["serve"], env=SIGNED)
    serve.wait_ready()
    webhook = run_pubrelay(["webhook"], env=SIGNED)
    webhook.wait_ready()
    assert post(webhook.url, event_body()) == 202
    assert post(serve.url, event_body()) == 202
    assert webhook.terminate() == 0
    assert serve.terminate() == 0


@pytest.mark.usefixtures("usual_umask")
def test_serve_keeps_every_file_with_customer_data_private(
    run_pubrelay: Launcher, tmp_path: Path
) -> None:
    # No configured secret: the generated one must be private too.
    server = run_pubrelay(["serve"], env={"PUBRELAY_HANDLERS__ENABLED": '["noop"]'})
    server.wait_ready()
    data = tmp_path / "var"
    body = event_body()
    assert post(server.url, body, (data / SECRET_FILE).read_text().strip()) == 202
    names = [SECRET_FILE, "bus.sqlite3.worker.lock"] + [
        f"{db}.sqlite3{suffix}" for db in ("bus", "ledger") for suffix in ("", "-wal", "-shm")
    ]
    deadline = time.monotonic() + 10
    while not all((data / name).exists() for name in names) and time.monotonic() < deadline:
        time.sleep(0.1)
    modes = {name: stat.S_IMODE((data / name).stat().st_mode) for name in names}
    assert modes == dict.fromkeys(names, 0o600)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert server.terminate() == 0


@pytest.mark.usefixtures("usual_umask")
def test_an_existing_secret_open_to_others_is_used_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    secret = tmp_path / "var" / SECRET_FILE
    secret.write_text("a-secret\n")
    secret.chmod(0o644)
    result = subprocess.run(
        [pubrelay_bin(), "sign", str(SAMPLE)],
        cwd=tmp_path,
        env={**os.environ, "PUBRELAY_LOG__FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert '"event":"data_file_not_private"' in result.stderr
    assert '"mode":"0644"' in result.stderr
    assert f'"path":"var/{SECRET_FILE}"' in result.stderr


def test_the_secret_is_written_through_a_new_private_file_never_through_a_planted_link(
    tmp_path: Path,
) -> None:
    # The temporary file's name used to be predictable (.webhook-secret.<pid>): a link
    # planted there made the secret land in, and overwrite, whatever the link named.
    data = tmp_path / "var"
    data.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("not yours\n")
    (data / f".{SECRET_FILE}.{os.getpid()}").symlink_to(victim)

    [value] = resolve_secrets(Settings(data_dir=data), generate=True)

    assert victim.read_text() == "not yours\n"
    secret = data / SECRET_FILE
    assert not secret.is_symlink()
    assert secret.read_text() == value + "\n"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    leftovers = sorted(p.name for p in data.iterdir() if p.name.startswith("."))
    assert leftovers == [f".{SECRET_FILE}.{os.getpid()}"]  # only the planted link


def test_serve_on_a_port_in_use_stops_before_its_worker_starts_naming_the_setting(
    run_pubrelay: Launcher,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = run_pubrelay(["serve"], env=SIGNED, port=port)
        try:
            code = server.proc.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve is still running:\n{server.output()}")

    assert code == 2
    [failed] = [
        json.loads(line) for line in server.output().splitlines() if "listen_failed" in line
    ]
    assert failed["hint"] == (
        f"127.0.0.1:{port} is in use by another process: stop it, or set PUBRELAY_HTTP__PORT "
        "to a free port"
    )
    assert "worker_started" not in server.output()  # nothing was consumed
    assert "Traceback" not in server.output()


@pytest.mark.parametrize("under", ["", "sub"], ids=["a-file", "under-a-file"])
def test_a_data_directory_that_cannot_be_one_is_named_with_its_setting(
    tmp_path: Path, under: str
) -> None:
    (tmp_path / "afile").write_text("not a directory")
    data_dir = tmp_path / "afile" / under if under else tmp_path / "afile"
    result = subprocess.run(
        [pubrelay_bin(), "serve"],
        cwd=tmp_path,
        env={**os.environ, **SIGNED, "PUBRELAY_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"(the data directory, PUBRELAY_DATA_DIR={data_dir}: it must be a directory" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
