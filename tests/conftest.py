"""Shared fixtures; each area keeps its own in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.app",
    "tests.fixtures.process",
    "tests.fixtures.kafka",
    "tests.fixtures.kafka_size_limit",
    "tests.fixtures.worker",
    "tests.fixtures.redis",
    "tests.fixtures.fake_hubspot",
    "tests.fixtures.fake_voucherify",
    "tests.fixtures.fake_receiver",
    "tests.fixtures.smtp",
    "tests.fixtures.logging_state",
]
