"""Every variable pubrelay knows: the root configuration and the built-in handlers' sections.

One list for the name check at start-up (``pubrelay/settings.py``: a ``PUBRELAY_*`` variable
nobody reads stops start-up, with the closest known name), ``pubrelay config``
(``pubrelay/config_command.py``) and the README's configuration table
(``pubrelay/settings_table.py``).

Sections of installed plugins that are not built in are known by their prefix alone
(``PUBRELAY_<NAME>__``): their model is only imported when the plugin is enabled, and then
:func:`handlers.config.load_section` checks their names the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from handlers.config import ENV_PREFIX, section_env_prefix
from handlers.config_errors import is_known, model_variables, suggestions, unknown_lines
from handlers.registry import available


@dataclass(frozen=True, slots=True)
class HandlerSection:
    """A built-in handler (the name it is enabled by) and the section it reads."""

    handler: str
    prefix: str
    model: type[BaseModel]

    @property
    def variables(self) -> dict[str, FieldInfo]:
        return model_variables(self.model, self.prefix)


def builtin_sections() -> list[HandlerSection]:
    """The built-in handlers' sections, in the README's order (imported on first use)."""
    # Imported here: the handlers' modules are only needed by commands that read settings.
    from handlers.builtin.crm.settings import CrmSettings  # noqa: PLC0415
    from handlers.builtin.email.settings import EmailSettings  # noqa: PLC0415
    from handlers.builtin.http import SETTINGS_SECTION, ForwardSettings  # noqa: PLC0415
    from handlers.builtin.metrics import PublicationMetricsSettings  # noqa: PLC0415
    from handlers.builtin.noop import NoopSettings  # noqa: PLC0415

    return [
        HandlerSection("email", section_env_prefix("email"), EmailSettings),
        HandlerSection("crm", section_env_prefix("crm"), CrmSettings),
        HandlerSection("http", section_env_prefix(SETTINGS_SECTION), ForwardSettings),
        HandlerSection("metrics", section_env_prefix("metrics"), PublicationMetricsSettings),
        HandlerSection("noop", section_env_prefix("noop"), NoopSettings),
    ]


def root_variables() -> dict[str, FieldInfo]:
    from pubrelay.settings import Settings  # noqa: PLC0415 - settings.py imports this module

    return model_variables(Settings, ENV_PREFIX)


def section_of(name: str, sections: Iterable[HandlerSection]) -> HandlerSection | None:
    return next((s for s in sections if name.startswith(s.prefix)), None)


def unknown_names(names: Iterable[str]) -> list[str]:
    """One line per ``PUBRELAY_*`` name no setting reads, with the closest known one.

    Known: the root's variables; the built-in handlers' variables, enabled or not (a ``.env``
    shared by the webhook and the worker, or a handler switched off for a while, keeps its
    section; ``pubrelay config`` lists it as unused); anything under the prefix of another
    installed plugin, whose own names its section checks when it is enabled. The handlers'
    modules and the installed plugins are looked up only for names outside the root.
    """
    root = root_variables()
    rest = [name for name in names if not is_known(name, root)]
    if not rest:
        return []
    sections = builtin_sections()
    builtin = {s.handler for s in sections}
    plugins = tuple(section_env_prefix(p) for p in available() if p not in builtin)
    unknown = []
    for name in rest:
        section = section_of(name, sections)
        known = is_known(name, section.variables) if section else name.startswith(plugins)
        if not known:
            unknown.append(name)
    return unknown_lines(unknown, _candidates(root, sections), ENV_PREFIX) if unknown else []


def _candidates(root: Mapping[str, FieldInfo], sections: list[HandlerSection]) -> dict[str, str]:
    candidates = suggestions(root, ENV_PREFIX)
    for section in sections:
        candidates |= suggestions(section.variables, ENV_PREFIX)
        # A handler named unlike its section (http reads FORWARD): its name with a field of
        # the section points at the section's variable.
        alias = section_env_prefix(section.handler).removeprefix(ENV_PREFIX)
        for name in section.variables:
            candidates.setdefault(alias + name.removeprefix(section.prefix), name)
    return candidates
