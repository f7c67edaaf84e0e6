"""``pubrelay config [--check]``: the effective configuration, told to a person.

Every variable with its value (secrets, tokens, passwords and URL credentials masked) and
where the value came from (``default``, ``environment``, ``.env``), then each enabled
handler's own section, read the way the worker reads it (the handler is built, not
started: nothing is connected or sent). Variables that nothing in this configuration
uses (a handler that is not enabled) are listed at the end. Every problem found, in the
root settings and in each enabled handler, is one line on stderr and the exit code is
2 (``pubrelay/exit_codes.py``); ``--check`` prints only the problems, or one line saying
all is well.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import structlog
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from handlers.config import ENV_PREFIX, Origin, handler_name_problem, read_variables
from handlers.config_errors import MASK, is_secret, mask_url, model_variables
from handlers.registry import create_handler, load_factory
from handlers.types import HandlerContext, M
from pubrelay.exit_codes import EXIT_CONFIG, EXIT_OK
from pubrelay.logging import configure_logging
from pubrelay.settings import Settings, load_settings
from schemas.errors import ConfigError, PluginError


def shown_value(name: str, value: Any, field: FieldInfo) -> str:
    """A value as ``pubrelay config`` prints it: secrets masked, lists and maps as JSON."""
    if isinstance(value, SecretStr):
        return MASK if value.get_secret_value() else ""
    if isinstance(value, list | tuple) and any(isinstance(v, SecretStr) for v in value):
        return json.dumps([MASK for _ in value])
    if value is None:
        return ""
    if isinstance(value, dict):
        # Header maps and the like: a credential may sit under any name (X-Hub-Access).
        value = dict.fromkeys(value, MASK)
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, list | tuple | dict):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    if text and is_secret(name, field):
        return MASK
    return mask_url(text)


def _leaf_values(model: BaseModel, prefix: str) -> dict[str, Any]:
    """The values of ``model`` by variable name, nested sections flattened."""
    found: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            found |= _leaf_values(value, prefix + name.upper() + "__")
        else:
            found[prefix + name.upper()] = value
    return found


def _origin(name: str, variables: Mapping[str, tuple[str, Origin]]) -> str:
    if name in variables:
        return variables[name][1]
    parts = [origin for key, (_, origin) in variables.items() if key.startswith(name + "__")]
    return parts[0] if parts else "default"


@dataclass(frozen=True, slots=True)
class _ReadSection:
    prefix: str
    section: BaseModel


@dataclass(frozen=True, slots=True)
class _RecordingContext(HandlerContext):
    """A handler's context that remembers the sections its factory read."""

    read: list[_ReadSection] = field(default_factory=list)

    def settings(self, model: type[M]) -> M:
        # HandlerContext.settings, named: super() has no cell in a slotted dataclass.
        section = HandlerContext.settings(self, model)
        self.read.append(_ReadSection(self.env_prefix, section))
        return section


def _build(name: str, settings: Settings) -> list[_ReadSection]:
    """Build handler ``name`` as the worker would (not started); the sections it read."""
    context = _RecordingContext(
        name=name,
        data_dir=settings.data_dir,
        metrics_registry=CollectorRegistry(),
        logger=structlog.get_logger("pubrelay.handlers").bind(handler=name),
        topic_prefix=settings.bus.topic_prefix,
        max_attempts=settings.worker.max_attempts,
    )
    create_handler(name, context, load_factory(name))
    return context.read


def _enabled_from_environment(variables: Mapping[str, tuple[str, Origin]]) -> list[str]:
    """``PUBRELAY_HANDLERS__ENABLED`` read alone, when the rest of the settings are wrong."""
    raw = variables.get(ENV_PREFIX + "HANDLERS__ENABLED", ("[]", "default"))[0]
    try:
        names = json.loads(raw)
    except ValueError:
        return []
    if not isinstance(names, list):
        return []
    # A name that is not a handler's (already said) is not looked up as a plugin too.
    return [n for n in names if isinstance(n, str) and not handler_name_problem(n)]


def _table(
    rows: Mapping[str, tuple[Any, FieldInfo]],
    variables: Mapping[str, tuple[str, Origin]],
    out: TextIO,
) -> None:
    width = max((len(n) for n in rows), default=8)
    for name, (value, info) in rows.items():
        text = shown_value(name, value, info)
        print(f"{name:<{width}}  {_origin(name, variables):<11}  {text}", file=out)


def run_config(*, check: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Print the configuration (or, with ``check``, only its problems); the exit code."""
    variables = read_variables()
    problems: list[str] = []
    settings: Settings | None = None
    try:
        settings = load_settings()
    except ConfigError as error:
        problems += str(error).splitlines()
    enabled = settings.handlers.enabled if settings else _enabled_from_environment(variables)
    sections: dict[str, list[_ReadSection]] = {}
    # With the root settings wrong, the handlers are still judged, on the defaults.
    base = settings or Settings.model_construct()
    configure_logging(base.log.level, base.log.format)
    for name in enabled:
        try:
            sections[name] = _build(name, base)
        except (ConfigError, PluginError) as error:
            problems += str(error).splitlines()
    if not check and settings is not None:
        _print_configuration(settings, sections, variables, out)
    for line in problems:
        print(f"pubrelay: {line}", file=err)
    if problems:
        return EXIT_CONFIG
    if check:
        listed = ", ".join(enabled) or "none"
        print(f"configuration OK (handlers enabled: {listed})", file=out)
    return EXIT_OK


def _print_configuration(
    settings: Settings,
    sections: Mapping[str, list[_ReadSection]],
    variables: Mapping[str, tuple[str, Origin]],
    out: TextIO,
) -> None:
    shown: set[str] = set()
    print("# effective configuration: VARIABLE  FROM  VALUE (secrets masked)", file=out)
    root_fields = model_variables(Settings, ENV_PREFIX)
    values = _leaf_values(settings, ENV_PREFIX)
    _table({n: (values[n], f) for n, f in root_fields.items()}, variables, out)
    shown |= set(root_fields)
    print(f"\n# handlers enabled: {', '.join(sections) or 'none'}", file=out)
    if settings.voucherify.configured:
        print(
            "# and the internal reconcile recorder (a Voucherify key pair is set; "
            "PUBRELAY_RECONCILE__INTERVAL_S > 0 also runs reconciliations)",
            file=out,
        )
    for name, read in sections.items():
        for item in read:
            print(f"\n# handler {name} ({item.prefix}*)", file=out)
            fields = model_variables(type(item.section), item.prefix)
            section_values = _leaf_values(item.section, item.prefix)
            _table({n: (section_values[n], f) for n, f in fields.items()}, variables, out)
            shown |= set(fields)
    unused = sorted(
        n for n in variables if n not in shown and not any(n.startswith(s + "__") for s in shown)
    )
    if unused:
        print("\n# set, but unused by this configuration (their handler is not enabled):", file=out)
        for name in unused:
            print(f"{name}  {variables[name][1]}", file=out)
