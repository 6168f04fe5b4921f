"""What travels between ranks besides tensors: JSON text, checked against the type the receiver expects.

Ranks may belong to different institutions, so nothing a peer sends is trusted: no pickle ever crosses the
wire (unpickling runs code the sender chose), only UTF-8 JSON, which parses to plain values and nothing else.
``decode`` then checks the parsed value against a type written as a hint (``dict[int, float]``,
``tuple[int, str] | None``, ``list[int | None]``) and converts what JSON cannot spell: tuples arrive as
lists, and integer dict keys as strings. Anything else is a ``WireError`` naming where the value is wrong.
The collectives that carry these bytes are ``fedrun.dist``'s.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from typing import Any

import numpy as np

MAX_PAYLOAD_BYTES = 64 * 2**20
"""Largest payload one rank accepts from one peer. The largest honest ones are a UNet's parameter names and
shapes (kB), the flat configs (kB) and a few sample grids (MB); a peer announcing more is refused before
anything is allocated for it."""

MAX_DEPTH = 32
"""Deepest nesting ``decode`` follows (honest payloads nest three deep): bounds the recursion a peer controls."""


class WireError(ValueError):
    """A payload that is not what the receiver expects (not UTF-8, not JSON, a wrong type or size)."""


def _plain(value: Any) -> Any:
    """What JSON cannot encode by itself but may still travel: numpy scalars as numbers, paths as text."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} cannot travel between ranks (only JSON values do)")


def encode(value: Any) -> bytes:
    """``value`` as compact UTF-8 JSON (NaN and infinities included: a diverged loss must still travel)."""
    return json.dumps(value, default=_plain, separators=(",", ":")).encode()


def parse(raw: bytes, expected: Any = Any) -> Any:
    """The value in ``raw`` (UTF-8 JSON), checked and converted by ``decode``; ``WireError`` otherwise."""
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise WireError(f"{len(raw)} bytes, more than the {MAX_PAYLOAD_BYTES} accepted")
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise WireError(f"not UTF-8 JSON (starts with {raw[:8]!r})") from None
    except json.JSONDecodeError as e:
        raise WireError(f"not JSON ({e.msg} at byte {e.pos}; starts with {raw[:8]!r})") from None
    except RecursionError:
        raise WireError("JSON nested too deeply") from None
    return decode(value, expected)


def decode(value: Any, expected: Any, where: str = "", depth: int = 0) -> Any:
    """``value`` (parsed JSON) as the type hint ``expected``: int, float, str, bool, None, Any, unions,
    ``list[T]``, ``tuple[T, ...]``, ``tuple[A, B]``, ``dict[int | str, T]``. ``WireError`` names the place."""
    if depth > MAX_DEPTH:
        raise WireError(f"{where or 'value'}: nested more than {MAX_DEPTH} deep")
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if expected is Any:
        return _check_plain(value, where, depth)
    if origin in (types.UnionType, typing.Union):
        for option in args:
            try:
                return decode(value, option, where, depth)
            except WireError:
                continue
        raise _wrong(value, expected, where)
    if expected in (type(None), None):
        if value is not None:
            raise _wrong(value, expected, where)
        return None
    if expected in (int, float, str, bool):
        return _scalar(value, expected, where)
    if origin in (list, tuple) and isinstance(value, list):
        return _sequence(value, origin, args, where, depth)
    if origin is dict and isinstance(value, dict):
        key_type, value_type = args
        return {_key(k, key_type, where): decode(v, value_type, f"{where}[{k!r}]", depth + 1) for k, v in value.items()}
    raise _wrong(value, expected, where)


def _scalar(value: Any, expected: type, where: str) -> Any:
    # bool is an int to Python but not to a receiver that counts images; an integral JSON number is a float.
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and (expected is bool or not isinstance(value, bool)):
        return value
    raise _wrong(value, expected, where)


def _sequence(value: list, origin: Any, args: tuple, where: str, depth: int) -> Any:
    if origin is list or (len(args) == 2 and args[1] is Ellipsis):
        return origin(decode(v, args[0], f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
    if len(value) != len(args):
        raise WireError(f"{where or 'value'}: expected {len(args)} items, got {len(value)}")
    return tuple(decode(v, t, f"{where}[{i}]", depth + 1) for i, (v, t) in enumerate(zip(value, args, strict=True)))


def _key(key: str, key_type: Any, where: str) -> Any:
    if typing.get_origin(key_type) in (types.UnionType, typing.Union):  # int | str: an integer key if it is one
        for option in typing.get_args(key_type):
            try:
                return _key(key, option, where)
            except WireError:
                continue
    if key_type is str:
        return key
    # JSON spells the integer key 3 as "3"; "03", " 3" or "3.0" are no key an honest rank sends.
    if key_type is int:
        try:
            if str(int(key)) == key:
                return int(key)
        except ValueError:
            pass
    raise WireError(f"{where or 'value'}: key {key[:40]!r} is not a {getattr(key_type, '__name__', key_type)}")


def _check_plain(value: Any, where: str, depth: int) -> Any:
    """Any parsed JSON is plain data already; only its depth is bounded."""
    if depth > MAX_DEPTH:
        raise WireError(f"{where or 'value'}: nested more than {MAX_DEPTH} deep")
    if isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_plain(v, f"{where}[{k!r}]", depth + 1)
    return value


def _wrong(value: Any, expected: Any, where: str) -> WireError:
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    name = getattr(expected, "__name__", None) or str(expected).replace("typing.", "")
    return WireError(f"{where or 'value'}: expected {name}, got {shown}")


ARRAY_DTYPES = ("|u1", "<f4", "<f8", "<i8")
"""Array dtypes a peer may send (numpy's byte-order strings): plain numbers only, never objects."""

ArrayMeta = dict[int, tuple[list[int], str]]
"""Shapes and dtypes of arrays keyed by int, in the order of their bytes in the buffer that follows."""


def arrays_from(meta: ArrayMeta, buf: bytes) -> dict[int, np.ndarray]:
    """The arrays ``meta`` announces, copied out of ``buf``, which must hold exactly their bytes."""
    out, pos = {}, 0
    for k, (shape, dtype) in meta.items():
        if dtype not in ARRAY_DTYPES or any(s < 0 for s in shape):
            raise WireError(f"array {k}: shape {shape[:8]} and dtype {dtype[:8]!r} (allowed: {ARRAY_DTYPES})")
        count = math.prod(shape)
        end = pos + count * np.dtype(dtype).itemsize
        if end > len(buf):
            raise WireError(f"array {k}: {len(buf)} bytes are fewer than the shapes announce")
        out[k] = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).reshape(shape).copy()
        pos = end
    if pos != len(buf):
        raise WireError(f"{len(buf)} bytes are more than the shapes announce ({pos})")
    return out
