"""`pubrelay webhook` as a user runs it, against clients that send slowly or not at all."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from consumer.signature import sign
from tests.fixtures.app import event_body
from tests.fixtures.process import Launcher

SECRET = "slow-clients-secret"
PATH = "/webhooks/voucherify"
# Generous: these bounds only fail when the server never answers or never closes.
WAIT_S = 6.0


@contextmanager
def stalled_body(port: int, sent: int) -> Iterator[socket.socket]:
    """A connection that sent its headers and ``sent`` bytes of a chunked body, then nothing."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(
            f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"x-voucherify-signature: {'0' * 64}\r\nTransfer-Encoding: chunked\r\n\r\n"
            f"{sent:x}\r\n".encode()
            + b" " * sent
        )
        yield sock


def read_to_close(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):  # a timeout raises: the server never closed
        received += chunk
    return received


def read_answer(sock: socket.socket) -> bytes:
    """The head of the answer (a timeout raises: the server never answered)."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    return received


def test_webhook_cuts_stalled_bodies_and_closes_half_open_connections(
    run_pubrelay: Launcher,
) -> None:
    webhook = run_pubrelay(
        ["webhook"],
        {
            "PUBRELAY_WEBHOOK__SECRETS": f'["{SECRET}"]',
            "PUBRELAY_HTTP__BODY_READ_TIMEOUT_S": "1",
            "PUBRELAY_HTTP__KEEPALIVE_TIMEOUT_S": "1",
        },
    )
    webhook.wait_ready()

    with ExitStack() as stack:
        stalled = [stack.enter_context(stalled_body(webhook.port, 512 * 1024)) for _ in range(20)]
        headers_only = stack.enter_context(
            socket.create_connection(("127.0.0.1", webhook.port), timeout=WAIT_S)
        )
        headers_only.sendall(f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())

        body = event_body()
        request = urllib.request.Request(
            webhook.url + PATH,
            data=body,
            headers={
                "Content-Type": "application/json",
                "x-voucherify-signature": sign(SECRET, body),
            },
        )
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            assert response.status == 202

        assert read_to_close(headers_only) == b""
        for sock in stalled:  # then closed once the server stops waiting for more (5 s)
            assert read_answer(sock).startswith(b"HTTP/1.1 408 ")

    with urllib.request.urlopen(webhook.url + "/metrics", timeout=WAIT_S) as response:
        metrics = response.read().decode()
    assert 'pubrelay_webhook_requests_total{outcome="body_timeout"} 20.0' in metrics
    assert 'pubrelay_webhook_requests_total{outcome="accepted"} 1.0' in metrics


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_client_pipelining_without_reading_cannot_grow_the_webhook_memory(
    run_pubrelay: Launcher,
) -> None:
    """Unsigned requests, each refused at once, pipelined on one connection that never
    reads an answer: the server stops reading once they back up, so its memory holds a
    bounded share of them, not the client's whole stream (128 MiB at most, 15 s)."""
    webhook = run_pubrelay(["webhook"], {"PUBRELAY_WEBHOOK__SECRETS": f'["{SECRET}"]'})
    webhook.wait_ready()
    before = rss_mib(webhook.proc.pid)
    requests = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx".encode() * 4096
    sent = 0
    deadline = time.monotonic() + 15
    with socket.create_connection(("127.0.0.1", webhook.port), timeout=2) as sock:
        try:
            while sent < 128 * 1024 * 1024 and time.monotonic() < deadline:
                sock.sendall(requests)  # a 2 s wait raises: the server stopped reading
                sent += len(requests)
        except TimeoutError:
            pass
        time.sleep(1)  # what the server read is in its buffers by now
        grown = rss_mib(webhook.proc.pid) - before
        assert grown < 64, f"the webhook grew {grown:.0f} MiB on {sent >> 20} MiB sent"
    body = event_body()
    request = urllib.request.Request(
        webhook.url + PATH,
        data=body,
        headers={"Content-Type": "application/json", "x-voucherify-signature": sign(SECRET, body)},
    )
    with urllib.request.urlopen(request, timeout=WAIT_S) as response:
        assert response.status == 202
