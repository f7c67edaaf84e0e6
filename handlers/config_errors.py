"""Configuration problems told in the user's words: one line per variable at fault.

``PUBRELAY_HTTP__PORT=abc: not a whole number; e.g. PUBRELAY_HTTP__PORT=8080``: the
variable as it is set (the value hidden for secrets), the problem in plain words, and a good
value (the field's ``examples``, else its default, else an example for its type). Used by
the root configuration (``pubrelay/settings.py``) and by every handler section
(``handlers/config.py``), so pydantic's own wording never reaches an operator.
"""

from __future__ import annotations

import difflib
import json
import re
import shlex
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo

_SHOWN_CHARS: Final = 60
_PROBLEMS: Final = {
    "int_parsing": "not a whole number",
    "int_from_float": "not a whole number",
    "int_type": "not a whole number",
    "float_parsing": "not a number",
    "float_type": "not a number",
    "bool_parsing": "neither true nor false",
    "bool_type": "neither true nor false",
    "list_type": "not a JSON list",
    "dict_type": "not a JSON map",
    "json_invalid": "not valid JSON",
    "json_type": "not valid JSON",
    "missing": "required, and not set",
    "url_parsing": "not a URL",
    "ip_v4_network": "not an IP network (an address, or an address/prefix length)",
    "ip_v6_network": "not an IP network (an address, or an address/prefix length)",
    "extra_forbidden": "not a setting of this section",
}
_SECRET_WORDS: Final = re.compile(r"(SECRET|TOKEN|PASSWORD)")
# Up to the last "@" of the URL: a password may hold "/", "#" or "@" unencoded.
_URL_USERINFO: Final = re.compile(r"(?P<scheme>[A-Za-z][\w+.-]*://)(?P<userinfo>\S*)@")
# The same without a scheme ("u:pw@h:9092", "redis//:pw@h"): a URL mistyped, where the
# error quotes it to say so.
_BARE_USERINFO: Final = re.compile(r"(?P<head>(?:^|[\s/])[^\s:/@]*):(?!//)\S*@")
_URL_QUERY: Final = re.compile(r"(?P<head>[A-Za-z][\w+.-]*://[^\s?#]*\?)(?P<query>[^\s#]*)")
_QUERY_VALUE: Final = re.compile(r"(?P<name>(?:^|&)[^=&]*=)[^&]*")
MASK: Final = "****"


def _unwrapped(annotation: Any) -> list[Any]:
    """The members of ``X | None`` / ``Union[...]`` (or ``[annotation]``)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def nested_model(field: FieldInfo) -> type[BaseModel] | None:
    """The model of a nested section (``PUBRELAY_<SECTION>__<FIELD>``), if ``field`` is one."""
    for member in _unwrapped(field.annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def is_secret(name: str, field: FieldInfo | None) -> bool:
    """Whether a value must never be shown: a ``SecretStr`` field, or a secret-like name."""
    if _SECRET_WORDS.search(name.upper()):
        return True
    if field is None:
        return False
    text = repr(field.annotation)
    return "SecretStr" in text


def is_map_field(field: FieldInfo) -> bool:
    """Whether the variable's value is a JSON map (headers and the like: its values may be
    credentials under any name)."""
    return any((typing.get_origin(m) or m) is dict for m in _unwrapped(field.annotation))


def masked_map(text: str) -> str:
    """A JSON map's keys, each value masked; text that is not a JSON map, hidden whole."""
    try:
        value = json.loads(text)
    except ValueError:
        return "<hidden: not a JSON map>"
    if not isinstance(value, dict):
        return "<hidden: not a JSON map>"
    return json.dumps(dict.fromkeys(value, MASK))


def is_json_field(field: FieldInfo) -> bool:
    """Whether the variable's value is JSON (lists and maps), as pydantic-settings reads it."""
    for member in _unwrapped(field.annotation):
        origin = typing.get_origin(member) or member
        if origin in (list, dict, set, tuple, frozenset):
            return True
    return False


def _json_shape(field: FieldInfo) -> str:
    for member in _unwrapped(field.annotation):
        if (typing.get_origin(member) or member) is dict:
            return 'a JSON map, like \'{"key": "value"}\''
    return 'a JSON list, like \'["a", "b"]\''


def _format(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict | tuple | set | frozenset):
        items = sorted(value) if isinstance(value, set | frozenset) else value
        return json.dumps(items if not isinstance(items, tuple) else list(items))
    return str(value)


def _example_for_type(field: FieldInfo) -> str | None:
    for member in _unwrapped(field.annotation):
        origin = typing.get_origin(member) or member
        args = typing.get_args(member)
        if origin is Literal:
            return _format(args[0])
        if member is bool:
            return "true"
        if member is int:
            return "10"
        if member is float:
            return "5.0"
        if member is Path:
            return "/var/lib/pubrelay"
        if origin is dict:
            return '{"key": "value"}'
        if origin is list:
            inner = _unwrapped(args[0]) if args else []
            if any(a in (IPv4Network, IPv6Network) for a in inner):
                return '["203.0.113.0/24", "2001:db8::/32"]'
            if SecretStr in inner:
                return '["a-long-random-secret"]'
            return '["a", "b"]'
        if member is SecretStr:
            return "a-long-random-secret"
    return None


def example_value(field: FieldInfo) -> str | None:
    """A good value of ``field`` as an operator writes it, or None when none can be given."""
    if field.examples:
        return _format(field.examples[0])
    default = None if field.is_required() else field.get_default(call_default_factory=True)
    if default not in (None, "", [], {}) and not isinstance(default, SecretStr | BaseModel):
        return _format(default)
    return _example_for_type(field)


def mask_url(text: str) -> str:
    """``text`` with the password (or a lone token) of every URL's userinfo masked, also
    in a URL whose scheme is mistyped or missing, and the values of its query string
    (``?access_token=...``)."""

    def masked(match: re.Match[str]) -> str:
        user, colon, _ = match["userinfo"].partition(":")
        return f"{match['scheme']}{user}:{MASK}@" if colon else f"{match['scheme']}{MASK}@"

    def query(match: re.Match[str]) -> str:
        return match["head"] + _QUERY_VALUE.sub(rf"\g<name>{MASK}", match["query"])

    text = _URL_QUERY.sub(query, _URL_USERINFO.sub(masked, text))
    return _BARE_USERINFO.sub(rf"\g<head>:{MASK}@", text) if "@" in text else text


def shown(name: str, value: str, field: FieldInfo | None) -> str:
    """``value`` as an operator may see it: hidden for secrets, URL credentials masked,
    shortened, shell-quoted."""
    if is_secret(name, field):
        return "<hidden>"
    if field is not None and is_map_field(field):
        value = masked_map(value)
    value = mask_url(value)
    cut = value if len(value) <= _SHOWN_CHARS else value[: _SHOWN_CHARS - 1] + "…"
    return shlex.quote(cut) if cut else "''"


def _with_example(name: str, field: FieldInfo | None) -> str:
    example = example_value(field) if field is not None else None
    return f"; e.g. {name}={shlex.quote(example)}" if example else ""


def problem_line(name: str, value: str | None, problem: str, field: FieldInfo | None) -> str:
    """One line: the variable (and its value when set), the problem, a good value."""
    where = name if value is None else f"{name}={shown(name, value, field)}"
    return f"{where}: {problem}{_with_example(name, field)}"


def _locate(
    model: type[BaseModel], prefix: str, loc: Sequence[int | str]
) -> tuple[str, FieldInfo | None, type[BaseModel] | None]:
    """The variable a pydantic error location names, its field, and the model it ended in."""
    parts: list[str] = []
    field: FieldInfo | None = None
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None or not isinstance(part, str) or part not in current.model_fields:
            break
        parts.append(part.upper())
        field = current.model_fields[part]
        current = nested_model(field)
    return prefix + "__".join(parts), field, current


def _problem(item: Mapping[str, Any], section: type[BaseModel] | None, prefix: str) -> str:
    kind = str(item["type"])
    if kind in _PROBLEMS:
        return _PROBLEMS[kind]
    message = str(item["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    message = message.replace("Input should be", "must be").replace("Input is", "is")
    if section is not None:
        for field_name in section.model_fields:
            message = re.sub(rf"\b{field_name}\b", prefix + field_name.upper(), message)
    return message


def describe_validation_error(
    err: ValidationError,
    model: type[BaseModel],
    prefix: str,
    values: Mapping[str, str],
    *,
    skip: int = 0,
) -> list[str]:
    """One line per variable at fault (the first problem of each), in the order reported.

    ``prefix`` is what the location's field names are appended to (``PUBRELAY_`` for the
    root, ``PUBRELAY_EMAIL__`` for a section); ``values`` the variables as set, by upper-case
    name; ``skip`` location parts that are not fields (a section's wrapper).
    """
    lines: dict[str, str] = {}
    for item in err.errors():
        loc = item["loc"][skip:]
        name, field, current = _locate(model, prefix, loc)
        if field is None or (current is not None and nested_model(field) is current):
            # A check across fields: the root's (no location) names its variables in its
            # message; a section's gets its field names written as variables.
            section, section_prefix = (model, prefix) if field is None else (current, name + "__")
            if not section_prefix.endswith("__"):
                section = None
            message = _problem(item, section, section_prefix)
            if "PUBRELAY_" not in message:
                message = f"{section_prefix}*: {message}"
            lines.setdefault(message, message)
            continue
        value = values.get(name)
        problem = _problem(item, None, prefix)
        if item["type"] in ("ip_v4_network", "ip_v6_network") and item.get("input") is not None:
            problem = f"{item['input']!r} is {problem}"
        lines.setdefault(name, problem_line(name, value, problem, field))
    return list(lines.values())


def describe_json_error(
    model: type[BaseModel], prefix: str, values: Mapping[str, str]
) -> list[str]:
    """The variables under ``prefix`` that must be JSON (lists, maps) and are not."""
    lines = []
    for name, value in sorted(values.items()):
        if not name.startswith(prefix):
            continue
        found, field, _ = _locate(model, prefix, name.removeprefix(prefix).lower().split("__"))
        if field is None or found != name or not is_json_field(field):
            continue
        try:
            json.loads(value)
        except ValueError:
            lines.append(problem_line(name, value, f"not {_json_shape(field)}", field))
    return lines


def model_variables(model: type[BaseModel], prefix: str) -> dict[str, FieldInfo]:
    """Every variable ``model`` reads under ``prefix``, nested sections flattened."""
    found: dict[str, FieldInfo] = {}
    for name, field in model.model_fields.items():
        env = prefix + name.upper()
        nested = nested_model(field)
        if nested is not None:
            found |= model_variables(nested, env + "__")
        else:
            found[env] = field
    return found


def is_known(name: str, known: Mapping[str, FieldInfo]) -> bool:
    """Whether ``name`` sets a known variable: itself, a key of a map field
    (``PUBRELAY_CRM__PROPERTIES__FIRSTNAME``), or a whole section as JSON."""
    if name in known:
        return True
    head = name
    while "__" in head:
        head = head.rsplit("__", 1)[0]
        if head in known and is_json_field(known[head]):
            return True
    return any(other.startswith(name + "__") for other in known)


def unknown_lines(names: Iterable[str], candidates: Mapping[str, str], prefix: str) -> list[str]:
    """One line per unknown variable, with the closest known name when one is close.

    ``candidates`` maps a name without ``prefix`` to the variable to suggest for it.
    """
    lines = []
    for name in sorted(names):
        close = difflib.get_close_matches(name.removeprefix(prefix), list(candidates), n=1)
        hint = f"; did you mean {candidates[close[0]]}?" if close else ""
        lines.append(f"{name}: no such setting{hint}")
    return lines


def suggestions(known: Iterable[str], prefix: str) -> dict[str, str]:
    """``unknown_lines``'s candidates for ``known`` variables."""
    return {name.removeprefix(prefix): name for name in known}
