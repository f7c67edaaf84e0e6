"""Plugin discovery through real entry points (a dist-info written on a temporary path)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from handlers.builtin.noop import NoopHandler
from handlers.registry import available, build_handlers
from handlers.types import Event, HandlerContext
from schemas.errors import ConfigError, PluginError

MODULE = __name__


def make_not_a_handler(context: HandlerContext) -> object:
    del context
    return object()


def make_misnamed(context: HandlerContext) -> NoopHandler:
    del context
    return NoopHandler("someone-else", frozenset())


def make_failing(context: HandlerContext) -> NoopHandler:
    raise RuntimeError(f"cannot build {context.name}")


class PlainHandle(NoopHandler):
    """``handle`` without ``async``: every event would fail with a TypeError when awaited."""

    def handle(self, event: Event) -> None:  # type: ignore[override]
        del event


def make_plain(context: HandlerContext) -> NoopHandler:
    return PlainHandle(context.name, frozenset())


def make_good(context: HandlerContext) -> NoopHandler:
    return NoopHandler(context.name, frozenset({"customer.publication.succeeded"}))


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Install a distribution with several entry points (by adding its dist-info to sys.path)."""
    dist = tmp_path / "fake_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugins\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[pubrelay.handlers]\n"
        "broken = no_such_module_for_pubrelay:create\n"
        f"notahandler = {MODULE}:make_not_a_handler\n"
        f"misnamed = {MODULE}:make_misnamed\n"
        f"failing = {MODULE}:make_failing\n"
        f"plain = {MODULE}:make_plain\n"
        f"good = {MODULE}:make_good\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def build(names: list[str], tmp_path: Path) -> list[object]:
    return list(
        build_handlers(
            names,
            data_dir=tmp_path,
            metrics_registry=CollectorRegistry(),
            topic_prefix="v.",
            env={},
        )
    )


def test_installed_plugins_are_discovered_by_entry_point(plugins: Path) -> None:
    found = available()
    assert {"broken", "notahandler", "misnamed", "failing", "good", "example"} <= set(found)


def test_only_enabled_plugins_are_loaded(plugins: Path) -> None:
    [handler] = build(["good"], plugins)  # "broken" is installed but not enabled
    assert isinstance(handler, NoopHandler)
    assert handler.name == "good"


def test_an_unknown_plugin_names_itself_and_lists_the_installed_ones(plugins: Path) -> None:
    with pytest.raises(PluginError) as err:
        build(["good", "emial"], plugins)
    message = str(err.value)
    assert "unknown handler plugin 'emial'" in message
    assert "example" in message
    assert "good" in message


def test_a_plugin_that_cannot_be_imported_stops_start_up(plugins: Path) -> None:
    with pytest.raises(
        PluginError,
        match=r"'broken' \(no_such_module_for_pubrelay:create\) cannot be loaded: "
        r"ModuleNotFoundError",
    ):
        build(["broken"], plugins)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("notahandler", "lacks the Handler protocol"),
        ("misnamed", "built a handler named 'someone-else'"),
        ("failing", "failed to build: RuntimeError: cannot build failing"),
        ("plain", "handle must be `async def`"),
    ],
)
def test_a_plugin_that_builds_no_proper_handler_stops_start_up(
    plugins: Path, name: str, reason: str
) -> None:
    with pytest.raises(PluginError, match=reason):
        build([name], plugins)


def test_a_handler_enabled_twice_is_a_configuration_error(plugins: Path) -> None:
    with pytest.raises(ConfigError, match="listed twice"):
        build(["good", "good"], plugins)


def test_the_context_carries_the_handler_logger_registry_and_data_dir(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    [handler] = build_handlers(
        ["example"],
        data_dir=tmp_path,
        metrics_registry=registry,
        topic_prefix="v.",
        env={"PUBRELAY_EXAMPLE__FILE_NAME": "seen.jsonl"},
    )
    assert handler.name == "example"
    assert getattr(handler, "path", None) == tmp_path / "seen.jsonl"
    assert registry.get_sample_value("pubrelay_example_lines_total", {"handler": "example"}) == 0
