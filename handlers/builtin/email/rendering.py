"""Jinja2 templates of the ``email`` handler: where they are looked up and how they render.

A message has three parts, each a template of its own: the subject
(``<base>.subject.txt``), the plain-text body (``<base>.txt``) and the HTML body
(``<base>.html``). Each part is looked up on its own, first match wins, along:

1. ``campaign/<campaign id>``          (``campaign/camp_f7fBbQxUuTN7dI7tGOo5XMDA.html``)
2. ``campaign/<slug of campaign name>`` (``campaign/spring-discounts.html``)
3. ``channel/<slug of channel>``        (``channel/api.html``, ``channel/automation.txt``)
4. ``default``                          (``default.html``)

first in ``PUBRELAY_EMAIL__TEMPLATE_DIR``, then among the built-in templates shipped in
``handlers/builtin/email/templates/`` (which hold only ``default.*``). A slug is the name in
lower case with every run of other characters than ``a-z0-9`` turned into ``-``. So a
campaign may override only its subject and keep the default bodies; give both ``.txt``
and ``.html`` when the two parts should tell the same story.

HTML templates (``.html``) are autoescaped, text templates are not. An undefined name is
an error (``StrictUndefined``), never silently empty; ``None`` values render as empty
text. A template that fails is a permanent fault: :class:`HandlerError` naming it.

A template that builds a URL (``PUBRELAY_EMAIL__LIST_UNSUBSCRIBE``, compiled with
:meth:`TemplateRenderer.compile_url`) percent-encodes every ``{{ … }}``: the value becomes
one URI component (``quote(str(value), safe="")``: ``a>b, c`` -> ``a%3Eb%2C%20c``), so
customer data can add no ``<``, ``>``, ``,``, space, quote or line break. ``|urlencode``
is not needed there and does not encode twice: it encodes the same way and marks its
result as :class:`UrlPart`, which is left as it is. Any other expression is text and is
encoded, even ``|safe`` or a filter applied after ``|urlencode``; write the URL's own
``/``, ``?``, ``&`` and ``=`` outside the braces.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote

import jinja2
from jinja2 import (
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    PackageLoader,
    StrictUndefined,
    select_autoescape,
)
from jinja2.filters import do_urlencode

from schemas.errors import ConfigError, HandlerError

__all__ = [
    "BUILTIN_TEMPLATES",
    "PART_SUFFIXES",
    "Part",
    "Rendered",
    "TemplateRenderer",
    "UrlPart",
    "slug",
    "template_bases",
]

Part = Literal["subject", "text", "html"]
PART_SUFFIXES: Final[Mapping[Part, str]] = {
    "subject": ".subject.txt",
    "text": ".txt",
    "html": ".html",
}
BUILTIN_TEMPLATES: Final = ("handlers.builtin.email", "templates")
"""The package and folder of the built-in templates (``default.subject.txt`` ...)."""

RECHECK_S: Final = 1.0
"""How long the template chosen for a list of names is used before it is looked up again."""
_CHOSEN_MAX: Final = 1024
_SLUG_RE: Final = re.compile(r"[^a-z0-9]+")
_ID_RE: Final = re.compile(r"[^A-Za-z0-9_-]+")


def slug(text: str | None) -> str:
    """``"Spring Discounts 2024!"`` -> ``"spring-discounts-2024"`` (empty for nothing)."""
    return _SLUG_RE.sub("-", (text or "").lower()).strip("-")


def template_bases(
    campaign_id: str | None, campaign_name: str | None, channel: str | None
) -> list[str]:
    """The base names a message's templates are looked up under, most specific first."""
    bases: list[str] = []
    safe_id = _ID_RE.sub("-", campaign_id or "").strip("-")
    for base in (
        f"campaign/{safe_id}" if safe_id else "",
        f"campaign/{slug(campaign_name)}" if slug(campaign_name) else "",
        f"channel/{slug(channel)}" if slug(channel) else "",
        "default",
    ):
        if base and base not in bases:
            bases.append(base)
    return bases


def _none_as_empty(value: Any) -> Any:
    """``{{ customer.name }}`` of a customer without a name renders nothing, not 'None'."""
    return "" if value is None else value


class UrlPart(str):
    """Text already percent-encoded for a URL (what ``|urlencode`` gives in a URL template):
    a URL template writes it as it is instead of encoding it again."""

    __slots__ = ()


def _url_component(value: Any) -> str:
    """What ``{{ value }}`` writes in a URL template: one percent-encoded URI component."""
    if value is None:
        return ""
    if isinstance(value, UrlPart):
        return value
    return quote(str(value), safe="")


def _urlencode(value: Any) -> UrlPart:
    """``|urlencode`` of a URL template: the same encoding as a bare ``{{ value }}`` for a
    string or number, Jinja2's ``k=v&k=v`` for a mapping or a list of pairs; never twice."""
    if isinstance(value, UrlPart):
        return value
    if isinstance(value, str) or not isinstance(value, Iterable):
        return UrlPart(_url_component(value))
    return UrlPart(do_urlencode(value))


@dataclass(frozen=True, slots=True)
class Rendered:
    """One rendered part and the template it came from (for logs and the preview)."""

    name: str
    text: str


class TemplateRenderer:
    """One Jinja2 environment over the operator's directory and the built-ins.

    Compiled templates are cached by Jinja2 and reloaded when their file changes, so an
    operator can fix a template without restarting the worker, then replay the dead
    letters it caused. Which file a part comes from, and whether it changed, is looked up
    again at most every ``RECHECK_S`` (1 s) per list of names: the look-up tries each more
    specific name first (a file system check and an exception each) and cost more than
    the rendering itself at a few hundred e-mails per second.
    """

    def __init__(self, template_dir: Path | None) -> None:
        if template_dir is not None and not template_dir.is_dir():
            raise ConfigError(
                f"PUBRELAY_EMAIL__TEMPLATE_DIR: {str(template_dir)!r} is not a directory"
            )
        self.template_dir = template_dir
        loaders: list[jinja2.BaseLoader] = []
        if template_dir is not None:
            loaders.append(FileSystemLoader(template_dir))
        loaders.append(PackageLoader(*BUILTIN_TEMPLATES))
        self.env = Environment(
            loader=ChoiceLoader(loaders),
            autoescape=select_autoescape(
                enabled_extensions=("html", "htm", "xml"), default_for_string=False, default=False
            ),
            undefined=StrictUndefined,
            finalize=_none_as_empty,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            auto_reload=True,
        )
        self.url_env = Environment(
            autoescape=False,  # noqa: S701 - a URL, not HTML: finalize percent-encodes instead
            undefined=StrictUndefined,
            finalize=_url_component,
            keep_trailing_newline=False,
        )
        self.url_env.filters["urlencode"] = _urlencode
        self._chosen: dict[tuple[str, ...], tuple[jinja2.Template, float]] = {}
        self._clock = time.monotonic

    def check(self) -> list[str]:
        """Compile every template now, so a syntax error stops start-up (ConfigError).

        Returns the names found; a bug that only shows with data (an undefined name)
        still surfaces per event.
        """
        names = self.env.list_templates(extensions=("txt", "html", "htm", "xml"))
        for name in names:
            try:
                self.env.get_template(name)
            except jinja2.TemplateSyntaxError as err:
                raise ConfigError(
                    f"email template {err.name or name} line {err.lineno}: {err.message}"
                ) from None
        return names

    def compile_url(self, source: str, label: str) -> jinja2.Template:
        """A URL template from a setting's value (``List-Unsubscribe``), every ``{{ … }}``
        percent-encoded (see the module's docs); ConfigError naming ``label`` if broken."""
        try:
            return self.url_env.from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise ConfigError(f"{label}: template error line {err.lineno}: {err.message}") from None

    def render(self, part: Part, bases: Sequence[str], context: Mapping[str, Any]) -> Rendered:
        """Render ``part`` from the first of ``bases`` that has it; HandlerError on a bug."""
        names = tuple(base + PART_SUFFIXES[part] for base in bases)
        try:
            template = self._select(names)
        except jinja2.TemplateSyntaxError as err:
            raise HandlerError(
                f"email template {err.name} line {err.lineno}: {err.message}"
            ) from err
        except jinja2.TemplatesNotFound as err:
            raise HandlerError(f"no email template found: tried {', '.join(names)}") from err
        name = template.name or names[-1]
        return Rendered(name, render_template(template, name, context))

    def _select(self, names: tuple[str, ...]) -> jinja2.Template:
        """The first of ``names`` that exists, as last looked up less than RECHECK_S ago."""
        now = self._clock()
        chosen = self._chosen.get(names)
        if chosen is not None and now - chosen[1] < RECHECK_S:
            return chosen[0]
        template = self.env.select_template(names)
        if len(self._chosen) >= _CHOSEN_MAX:  # one entry per campaign and channel seen
            self._chosen.clear()
        self._chosen[names] = (template, now)
        return template


def render_template(template: jinja2.Template, name: str, context: Mapping[str, Any]) -> str:
    """Render, turning any template failure into :class:`HandlerError` naming ``name``."""
    try:
        return template.render(context)
    except jinja2.TemplateError as err:
        where = f" line {err.lineno}" if isinstance(err, jinja2.TemplateSyntaxError) else ""
        raise HandlerError(
            f"email template {name}{where}: {type(err).__name__}: {err.message or err}"
        ) from err
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as err:
        # A filter or an expression failed on the data (e.g. a format applied to None).
        raise HandlerError(f"email template {name}: {type(err).__name__}: {err}") from err
