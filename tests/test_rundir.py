"""fedrun.rundir: the paths of a run directory, the DONE rule, what a resume may change, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

from fedrun.rundir import RESUMABLE_CHANGES, RunDir, atomic_write_bytes, atomic_write_json, config_differences


def test_paths_and_model_names(tmp_path):
    d = RunDir(tmp_path / "r")
    assert d.config == tmp_path / "r" / "config.json" and d.done == tmp_path / "r" / "DONE"
    assert d.model_file("global") == d.models / "global.pt"
    assert d.model_file("client2", ema=True) == d.models / "client2_ema.pt"
    assert d.sample_grid("global") == d.samples / "final.png"
    assert d.sample_grid("client0") == d.samples / "final_client0.png"
    # a RunDir goes wherever a path does
    assert Path(d) == d.root and RunDir(d).root == d.root


def test_done_rule(tmp_path, capsys):
    d = RunDir(tmp_path)
    assert not d.is_done(3)
    d.mark_done(3)
    assert json.loads(d.done.read_text())["rounds"] == 3
    assert d.is_done(3)
    assert not d.is_done(5)  # more rounds than finished: a resume, not done
    d.clear_done()
    assert not d.done.exists() and not d.is_done(3)
    d.clear_done()  # clearing twice is fine
    d.done.write_text("{}")
    assert d.is_done(7)  # no round count: finished
    d.done.write_text("garbage")
    assert not d.is_done(3)
    assert "unreadable" in capsys.readouterr().err
    for damaged in ("", "[]", "5", "null", '{"rounds": "x"}'):  # issue 12: never a traceback
        d.done.write_text(damaged)
        assert not d.is_done(3), damaged


def test_config_differences_ignore_resumable_fields():
    saved = {"federation.method": "full", "federation.clients": 2, "federation.rounds": 3, "model.dim_mults": [1, 2]}
    new = {"federation.method": "udec", "federation.clients": 3, "federation.rounds": 9, "model.dim_mults": (1, 2)}
    assert "federation.rounds" in RESUMABLE_CHANGES and "data.placement" in RESUMABLE_CHANGES
    assert config_differences(saved, new) == ["federation.clients (2 -> 3)", "federation.method ('full' -> 'udec')"]
    assert config_differences(saved, dict(saved)) == []


def test_atomic_writers_leave_no_temporary_files(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "x.bin", b"1")
    atomic_write_bytes(tmp_path / "a" / "x.bin", b"22")
    atomic_write_json(tmp_path / "a" / "y.json", {"b": 1})
    assert (tmp_path / "a" / "x.bin").read_bytes() == b"22"
    assert json.loads((tmp_path / "a" / "y.json").read_text()) == {"b": 1}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.bin", "y.json"]
