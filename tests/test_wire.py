"""fedrun.wire: what a rank accepts from a peer is JSON of the expected type, nothing else (no process group)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedrun import wire


def _round_trip(value: Any, expected: Any) -> Any:
    return wire.parse(wire.encode(value), expected)


def test_round_trip_restores_tuples_int_keys_and_floats_exactly():
    losses = {0: 0.1 + 0.2, 3: 1e-300, 10: float("nan")}
    back = _round_trip(({k: v for k, v in losses.items()}, 7, 123), tuple[dict[int, float], int, int])
    assert back[1:] == (7, 123) and list(back[0]) == [0, 3, 10]
    assert back[0][0] == 0.1 + 0.2 and back[0][3] == 1e-300 and math.isnan(back[0][10])  # bit for bit
    assert _round_trip((4, Path("/r/round-000004")), tuple[int, str] | None) == (4, "/r/round-000004")
    assert _round_trip(None, tuple[int, str] | None) is None
    assert _round_trip([3, None, np.int64(5)], list[int | None]) == [3, None, 5]
    assert _round_trip([("enc.w", (4, 3), "f32")], list[tuple[str, tuple[int, ...], str]]) == [("enc.w", (4, 3), "f32")]
    assert _round_trip({"3": "x", "same": 1}, dict[int | str, Any]) == {3: "x", "same": 1}
    assert _round_trip(2, float) == 2.0 and isinstance(_round_trip(2, float), float)


@pytest.mark.parametrize(
    "value, expected, where",
    [
        (True, int, "expected int"),  # a bool is no image count
        (1.5, int, "expected int"),
        ("1", float, "expected float"),
        ([1, 2, 3], tuple[int, int], "expected 2 items"),
        ({"01": 1.0}, dict[int, float], "key '01'"),
        ({" 1": 1.0}, dict[int, float], "key ' 1'"),
        ({"٣": 1.0}, dict[int, float], "key"),  # an Arabic-Indic 3 is a digit to int(), not a key we send
        ({"a": [1, "x"]}, dict[str, list[int]], "['a'][1]: expected int"),
        ("x" * 1000, bool, "..."),  # what a peer sent is shown cut short
    ],
)
def test_wrong_types_are_refused_with_where(value, expected, where):
    with pytest.raises(wire.WireError) as err:
        _round_trip(value, expected)
    assert where in str(err.value) and len(str(err.value)) < 200


def test_a_pickle_is_not_json_and_is_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "PWNED"), "w"))

    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(wire.WireError, match="not (UTF-8 )?JSON"):
            wire.parse(pickle.dumps(Evil(), protocol=protocol), Any)
    assert not (tmp_path / "PWNED").exists()


def test_sizes_and_depth_are_bounded():
    with pytest.raises(wire.WireError, match="more than"):
        wire.parse(b" " * (wire.MAX_PAYLOAD_BYTES + 1), Any)
    with pytest.raises(wire.WireError, match="nested"):
        wire.parse(b"[" * 100_000 + b"]" * 100_000, Any)
    with pytest.raises(wire.WireError, match="nested"):
        wire.parse(b"[" * 40 + b"]" * 40, Any)
    with pytest.raises(TypeError, match="cannot travel"):
        wire.encode(object())


def test_arrays_from_checks_the_bytes_against_the_shapes():
    grid = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    other = np.linspace(0, 1, 5).astype(np.float32)
    meta = _round_trip({0: (list(grid.shape), grid.dtype.str), 2: (list(other.shape), other.dtype.str)}, wire.ArrayMeta)
    out = wire.arrays_from(meta, grid.tobytes() + other.tobytes())
    assert np.array_equal(out[0], grid) and np.array_equal(out[2], other) and out[2].dtype == np.float32
    assert out[0].flags.writeable  # a copy, not a view of the received buffer
    with pytest.raises(wire.WireError, match="fewer"):
        wire.arrays_from(meta, grid.tobytes())
    with pytest.raises(wire.WireError, match="more"):
        wire.arrays_from(meta, grid.tobytes() + other.tobytes() + b"x")
    for bad in ({0: ([2], "|O")}, {0: ([-1], "|u1")}, {0: ([10**30], "|u1")}):
        with pytest.raises(wire.WireError):
            wire.arrays_from(bad, b"ab")
