"""How a config checks its fields: the one-line ``ConfigError``, range and choice checks, declared types.

``fedrun.config`` validates every section with these in ``__post_init__``; torch-free, like it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming field and allowed values."""


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Unless ``ok``: ConfigError 'invalid NAME=VALUE: ALLOWED'."""
    if not ok:
        raise ConfigError(f"invalid {name}={value!r}: {allowed}")


def choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """``value`` is one of ``choices``, else a ConfigError listing them."""
    check(value in choices, name, value, "allowed: " + ", ".join(choices))


def is_a(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the declared type ``tp`` (an int counts as a float, a list as a tuple)."""
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return any(is_a(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):  # bool is an int to Python, never to a config
        return isinstance(value, int if tp is int else (int, float)) and not isinstance(value, bool)
    if typing.get_origin(tp) is tuple:
        return isinstance(value, (tuple, list)) and all(is_a(v, typing.get_args(tp)[0]) for v in value)
    return isinstance(value, tp)


def describe_type(tp: Any) -> str:
    """A declared type in a user's words: 'an integer or none'."""
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    names = {type(None): "none", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is tuple:
        return "a list of integers"
    return f"a {tp.__name__}"


def check_types(section: Any, prefix: str) -> None:
    """Every field of ``section`` has its declared type: a config.json may hold null, a list or 2.5 where an
    integer belongs, and the range checks after this one must not meet them (a TypeError, not one line)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        check(is_a(value, hints[f.name]), prefix + f.name, value, "expected " + describe_type(hints[f.name]))
