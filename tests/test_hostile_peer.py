"""A hostile peer cannot run code on an honest rank: nothing a rank receives is ever unpickled (issue 12, item 1).

Three layers. The source has no object collective (torch's ``*_object`` functions unpickle what a peer sends,
and unpickling runs code the peer chose). ``fedrun.dist``'s collectives refuse frames forged by a real spawned
gloo rank (pickles, a huge length, JSON of the wrong type, an array of objects, a pickle after a mismatched
digest) with one clear ``PeerPayloadError`` on the honest rank. And a real ``fedrun train`` beside
tests/hostile_peer.py (the honest CLI, except that every payload it sends is a pickle that creates a file when
unpickled) stops with one ``fedrun: error:`` line, and the file never exists.
"""

from __future__ import annotations

import ast
import pickle
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from hostile_peer import Evil
from multiproc import spawn_ranks
from sites import run_sites

from fedrun import agreement
from fedrun import dist as fdist
from fedrun.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
OBJECT_COLLECTIVES = {
    "all_gather_object",
    "broadcast_object_list",
    "gather_object",
    "scatter_object_list",
    "send_object_list",
    "recv_object_list",
    "broadcast_object",
    "_all_gather_object",
}


def test_no_object_collective_and_no_pickle_in_the_runtime():
    """Nothing in fedrun/ or evaluation/ calls an object collective or imports pickle."""
    found = []
    for path in sorted([*(REPO / "fedrun").rglob("*.py"), *(REPO / "evaluation").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            name = (
                node.attr
                if isinstance(node, ast.Attribute)
                else node.id
                if isinstance(node, ast.Name)
                else node.name
                if isinstance(node, ast.FunctionDef)
                else None
            )
            if name in OBJECT_COLLECTIVES:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                found += [
                    f"{path.relative_to(REPO)}:{node.lineno} imports {m}"
                    for m in mods
                    if m.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle")
                ]
    assert not found, "pickles between ranks:\n" + "\n".join(found)


# -- forged frames from a real gloo rank -------------------------------------------------------------------


def _forge(payload: bytes, length: int | None = None) -> None:
    """What a hostile rank sends into an all_gather of bytes: its length, then its bytes padded to the longest.
    With ``length``, only that length (the honest rank refuses it before the bytes)."""
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
    tdist.all_gather(lengths, torch.tensor([len(payload) if length is None else length]))
    if length is not None:
        return
    buf = torch.zeros(max(max(int(t) for t in lengths), 1), dtype=torch.uint8)
    buf[: len(payload)] = torch.tensor(list(payload), dtype=torch.uint8)
    tdist.all_gather([torch.empty_like(buf) for _ in range(2)], buf)


def _forge_broadcast(payload: bytes) -> None:
    tdist.broadcast(torch.tensor([len(payload)]), src=1)
    tdist.broadcast(torch.tensor(list(payload), dtype=torch.uint8), src=1)


def _forge_digest() -> None:
    """A digest that differs from the honest rank's, so it asks for the details next."""
    tdist.all_gather([torch.zeros(32, dtype=torch.uint8) for _ in range(2)], torch.full((32,), 7, dtype=torch.uint8))


def _cases(marker: str) -> list[tuple[str, Any, Any]]:
    """(name, what the honest rank 0 calls, what the hostile rank 1 sends), in the order both run them."""
    p0, p5 = pickle.dumps(Evil(marker), protocol=0), pickle.dumps(Evil(marker), protocol=5)  # 0 is ASCII
    cfg = RunConfig()
    return [
        ("control", lambda: fdist.all_gather_json({"a": 1}, dict[str, int]), lambda: _forge(b'{"a":2}')),
        ("pickle0", lambda: fdist.all_gather_json({"a": 1}, dict[str, int], "sizes"), lambda: _forge(p0)),
        ("pickle5", lambda: fdist.gather_dict({0: 0.5}, float, "round losses"), lambda: _forge(p5)),
        ("ints", lambda: fdist.all_gather_ints([3, None], "client sizes"), lambda: _forge(p5)),
        ("huge", lambda: fdist.all_gather_json(1), lambda: _forge(b"", length=2**40)),
        ("negative", lambda: fdist.all_gather_json(1), lambda: _forge(b"", length=-5)),
        ("type", lambda: fdist.gather_dict({0: 0.5}, float), lambda: _forge(b'{"1":"0.5"}')),
        ("bool", lambda: fdist.all_gather_ints([3, None]), lambda: _forge(b"[null,true]")),
        (
            "objects",
            lambda: fdist.gather_arrays({0: np.zeros(2, np.uint8)}),
            lambda: (_forge(b'{"1":[[2],"|O"]}'), _forge(b"ab")),
        ),
        ("broadcast", lambda: fdist.broadcast_json(None, bool, src=1), lambda: _forge_broadcast(p5)),
        ("signature", lambda: agreement.check_signature([("w", (2,), "f32")]), lambda: (_forge_digest(), _forge(p5))),
        ("config", lambda: agreement.check_run_config(cfg), lambda: (_forge_digest(), _forge(p0))),
    ]


def _forged_frames_scenario(ctx: fdist.DistContext, marker: str) -> dict:
    out: dict = {}
    for name, honest, hostile in _cases(marker):
        if ctx.rank == 1:
            hostile()
            continue
        try:
            out[name] = {"value": honest()}
        except fdist.PeerError as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    tdist.barrier()
    return out


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_forged_frames_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "PWNED"
    results = spawn_ranks(
        2, partial(_forged_frames_scenario, marker=str(marker)), tmp_path, timeout_s=90, label="forged frames"
    )
    seen = results[0]
    assert seen.pop("control") == {"value": [{"a": 1}, {"a": 2}]}  # the forged frames speak the real protocol
    expected = {
        "pickle0": "rank 1 sent an invalid sizes (not JSON",
        "pickle5": "rank 1 sent an invalid round losses (not",
        "ints": "rank 1 sent an invalid client sizes",
        "huge": f"rank 1 announced {2**40} bytes",
        "negative": "rank 1 announced -5 bytes",
        "type": "['1']: expected float, got '0.5'",
        "bool": "[1]: expected int",
        "objects": "dtype '|O'",
        "broadcast": "rank 1 sent an invalid value (not",
        "signature": "rank 1 sent an invalid shared parameters",
        "config": "rank 1 sent an invalid config (not",
    }
    for name, text in expected.items():
        error = seen[name].get("error", "")
        assert error.startswith("PeerPayloadError: ") and text in error, (name, seen[name])
        assert "\n" not in error and len(error) < 300, error
    assert not marker.exists()


# -- a hostile rank beside a real `fedrun train` -------------------------------------------------------------


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "hostile_rank, extra, where",
    [
        (1, [], "client sizes"),  # same config: the first payload rank 1 sends is its clients' sizes
        (0, [], "client sizes"),  # the same from rank 0, to the honest rank 1
        (1, ["--lr", "3e-4"], "config"),  # a config mismatch: the flat configs travel to name the fields
    ],
)
def test_fedrun_train_beside_a_hostile_rank_runs_nothing(repo_root, fmnist_root, tmp_path, hostile_rank, extra, where):
    marker = tmp_path / "PWNED"
    args = [
        "train",
        "--preset",
        "tiny",
        "--seed",
        "7",
        "--data-root",
        str(fmnist_root),
        "--device",
        "cpu",
        "--out-dir",
        str(tmp_path / "runs"),
        "--name",
        "run",
        "--set",
        "dist_timeout_s=600",
    ]
    commands = [["-m", "fedrun", *args], ["-m", "fedrun", *args]]
    commands[hostile_rank] = [str(repo_root / "tests" / "hostile_peer.py"), str(marker), *args, *extra]
    sites = run_sites(commands, tmp_path, timeout_s=400, repo_root=repo_root)
    honest = sites[1 - hostile_rank]
    assert not marker.exists(), "the hostile rank's pickle ran on the honest rank"
    assert honest.rc == 1, (honest.rc, honest.stderr[-3000:])
    assert "Traceback" not in honest.stderr, honest.stderr[-3000:]
    assert len(honest.error_lines) == 1, honest.stderr[-3000:]
    line = honest.error_lines[0]
    assert line.startswith(f"fedrun: error: rank {hostile_rank} sent an invalid {where} (not"), line
    assert honest.seconds < 300  # below dist_timeout_s: a refusal, not a timeout
