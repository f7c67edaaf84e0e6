"""The handler contract suite runs over every installed ``pubrelay.handlers`` entry point.

A handler that needs a server or settings to start registers an environment here:
an async context manager that starts what it needs (a real server on 127.0.0.1) and
yields the settings overrides for that handler's section. Handlers not listed get an
empty section (their defaults).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from handlers.registry import available, build_handlers
from handlers.types import Handler
from tests.fixtures.fake_hubspot import TOKEN as HUBSPOT_TOKEN
from tests.fixtures.fake_hubspot import FakeHubSpot, serve
from tests.fixtures.fake_receiver import PATH as RECEIVER_PATH
from tests.fixtures.fake_receiver import SECRET as RECEIVER_SECRET
from tests.fixtures.fake_receiver import FakeReceiver
from tests.fixtures.smtp import SmtpServer

Environment = Callable[[Path], AbstractAsyncContextManager[Mapping[str, Any]]]


@asynccontextmanager
async def no_environment(tmp_path: Path) -> AsyncIterator[Mapping[str, Any]]:
    del tmp_path
    yield {}


@asynccontextmanager
async def example_environment(tmp_path: Path) -> AsyncIterator[Mapping[str, Any]]:
    del tmp_path
    yield {"file_name": "contract.jsonl"}


@asynccontextmanager
async def crm_environment(tmp_path: Path) -> AsyncIterator[Mapping[str, Any]]:
    del tmp_path
    fake = FakeHubSpot()
    runner, fake.url = await serve(fake.app())
    try:
        yield {"token": HUBSPOT_TOKEN, "base_url": fake.url, "batch_window_s": 0.05}
    finally:
        await runner.cleanup()


@asynccontextmanager
async def http_environment(tmp_path: Path) -> AsyncIterator[Mapping[str, Any]]:
    del tmp_path
    fake = FakeReceiver()
    runner, base = await serve(fake.app())
    try:
        yield {"url": base + RECEIVER_PATH, "secret": RECEIVER_SECRET}
    finally:
        await runner.cleanup()


@asynccontextmanager
async def email_environment(tmp_path: Path) -> AsyncIterator[Mapping[str, Any]]:
    del tmp_path
    server = SmtpServer()
    await asyncio.to_thread(server.start)
    try:
        yield {
            "smtp_url": server.url,
            "sender": "Shop <coupons@shop.example>",
            "max_per_s": 0,
            "timeout_s": 5,
        }
    finally:
        await asyncio.to_thread(server.stop)


# Handlers that need a server to start get one here (a real server on 127.0.0.1).
ENVIRONMENTS: dict[str, Environment] = {
    "example": example_environment,
    "crm": crm_environment,
    "email": email_environment,
    "http": http_environment,
}


BUILT_IN = frozenset({"crm", "email", "example", "http", "metrics", "noop"})
"""Handlers built from an empty environment here, whatever the developer's shell holds."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "handler_name" in metafunc.fixturenames:
        metafunc.parametrize("handler_name", sorted(available()))


@pytest.fixture
async def handler_under_test(
    handler_name: str, tmp_path: Path, registry: CollectorRegistry
) -> AsyncIterator[Handler]:
    """The real handler, built through its entry point in a prepared environment; a
    plugin this suite does not know (a third party's, installed beside pubrelay) reads its
    ``PUBRELAY_<NAME>__*`` settings from the process environment, as in production."""
    environment = ENVIRONMENTS.get(handler_name, no_environment)
    async with environment(tmp_path) as overrides:
        [handler] = build_handlers(
            [handler_name],
            data_dir=tmp_path / "data",
            metrics_registry=registry,
            topic_prefix="voucherify.",
            env={} if handler_name in ENVIRONMENTS or handler_name in BUILT_IN else None,
            overrides={handler_name: overrides},
        )
        yield handler
