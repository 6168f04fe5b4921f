"""How a config checks its fields: the one-line ``ConfigError``, range and choice checks, declared types.

``fedrun.config`` validates every section with these in ``__post_init__``; torch-free, like it.
"""

from __future__ import annotations

import dataclasses
import difflib
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
        return "a list of integers" if typing.get_args(tp)[0] is int else "a list of numbers"
    return f"a {tp.__name__}"


def check_types(section: Any, prefix: str) -> None:
    """Every field of ``section`` has its declared type: a config.json may hold null, a list or 2.5 where an
    integer belongs, and the range checks after this one must not meet them (a TypeError, not one line)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        check(is_a(value, hints[f.name]), prefix + f.name, value, "expected " + describe_type(hints[f.name]))


def suggest_fields(key: str, known: list[str], n: int = 3) -> list[str]:
    """The known field names nearest to ``key``, best first: the same leaf in another section ('rounds' ->
    'federation.rounds'), else fields whose name has it as a word ('ema' -> 'optim.ema_decay'), else the
    closest spellings of the leaf (difflib), within the section when it names one; ``known``: every dotted
    field name."""
    section, _, leaf = key.rpartition(".")
    same_leaf = [k for k in known if k.rpartition(".")[2] == leaf]
    if same_leaf:
        return same_leaf[:n]
    words = [k for k in known if leaf in k.rpartition(".")[2].split("_")]
    if words:
        return words[:n]
    pool = [k for k in known if k.rpartition(".")[0] == section] or known
    leaves = {k.rpartition(".")[2]: k for k in pool}
    return [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=n, cutoff=0.6)]


def unknown_name_message(key: str, known: list[str]) -> str:
    """One line: 'unknown config field 'optim.lrr' (did you mean optim.lr?)', ``known`` the dotted field names."""
    close = suggest_fields(key, known)
    hint = f" (did you mean {' or '.join(close)}?)" if close else " (`fedrun config` prints every field)"
    return f"unknown config field {key!r}{hint}"


def parse_value(text: Any, tp: Any, name: str) -> Any:
    """A string from the command line or a config file as a value of the declared type ``tp`` (none/null for
    an optional field, '1,2,4' for a tuple); any other value is returned as it is."""
    if not isinstance(text, str):
        return text
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if text.lower() in ("none", "null", ""):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return parse_value(text, inner[0], name)
    try:
        if tp is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
        if origin is tuple:
            item = int if args[0] is int else float
            return tuple(item(v) for v in text.strip("()[] ").split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"invalid {name}={text!r}: expected {getattr(tp, '__name__', tp)}") from None
    return text
