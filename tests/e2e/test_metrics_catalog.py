"""`/metrics` of `pubrelay serve` with every built-in handler: what the README promises."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.fixtures.fake_hubspot import TOKEN, FakeHubSpot
from tests.fixtures.fake_receiver import FakeReceiver
from tests.fixtures.fake_voucherify import APP_ID, APP_TOKEN, FakeVoucherify
from tests.fixtures.process import Launcher
from tests.fixtures.smtp import SmtpServer

README = Path(__file__).resolve().parents[2] / "README.md"
ALL_HANDLERS = '["email", "crm", "http", "metrics", "noop"]'


def readme_metric_names() -> set[str]:
    """The metric names of the README's table (section "Observability")."""
    section = README.read_text().split("## Observability", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(pubrelay_[a-z0-9_]+)`", section, re.MULTILINE))


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
        assert response.status == 200
        return await response.text()


async def test_metrics_have_no_created_series_a_build_info_and_every_family_in_the_readme(
    run_pubrelay: Launcher,
    smtp_server: SmtpServer,
    fake_hubspot: FakeHubSpot,
    fake_receiver: FakeReceiver,
    fake_voucherify: FakeVoucherify,
) -> None:
    env = {
        "PUBRELAY_WEBHOOK__SECRETS": '["s"]',
        "PUBRELAY_HANDLERS__ENABLED": ALL_HANDLERS,
        "PUBRELAY_EMAIL__SMTP_URL": smtp_server.url,
        "PUBRELAY_EMAIL__SENDER": "Shop <coupons@shop.example>",
        "PUBRELAY_CRM__TOKEN": TOKEN,
        "PUBRELAY_CRM__BASE_URL": fake_hubspot.url,
        "PUBRELAY_FORWARD__URL": fake_receiver.url,
        "PUBRELAY_FORWARD__SECRET": fake_receiver.secret,
        "PUBRELAY_VOUCHERIFY__API_URL": fake_voucherify.url,
        "PUBRELAY_VOUCHERIFY__APP_ID": APP_ID,
        "PUBRELAY_VOUCHERIFY__APP_TOKEN": APP_TOKEN,
    }
    server = run_pubrelay(["serve"], env=env)
    await asyncio.to_thread(server.wait_ready)
    text = await scrape(server.url)
    assert server.terminate() == 0

    families = [f for f in text_string_to_metric_families(text) if f.name.startswith("pubrelay_")]
    samples: list[Sample] = [s for f in families for s in f.samples]
    assert not [s.name for s in samples if s.name.endswith("_created")]
    [build] = [s for s in samples if s.name == "pubrelay_build_info"]
    assert build.value == 1
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", build.labels["version"])
    space = {s.name: s.value for s in samples if s.name.startswith("pubrelay_data_dir_")}
    assert 0 < space["pubrelay_data_dir_free_bytes"] <= space["pubrelay_data_dir_size_bytes"]

    # The parser drops a counter's `_total` from the family name; the README shows it.
    served = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    documented = readme_metric_names()
    assert sorted(served - documented) == [], "metric families missing from the README table"
    assert sorted(documented - served) == [], "README rows for metrics the app does not serve"

    for family in families:
        help_text = family.documentation
        assert help_text[:1].isupper(), (family.name, help_text)
        assert help_text.endswith("."), (family.name, help_text)
        assert "  " not in help_text, (family.name, help_text)
