import pytest
import torch

from fedrun import checkpoint as ckpt
from fedrun.rundir import atomic_save


def _write_round(run_dir, rnd, clients=2, keep=5):
    rdir = ckpt.round_dir(run_dir, rnd)
    files = {ckpt.shared_file(rdir).name: {"round": rnd}}
    files |= {ckpt.client_file(rdir, k).name: {"w": torch.full((3,), float(rnd * 10 + k))} for k in range(clients)}
    ckpt.write_part(rdir, 0, files)
    ckpt.mark_latest(run_dir, rnd)
    ckpt.prune(run_dir, rnd, keep)
    return rdir


def test_finalize_writes_manifest_latest_and_prunes(tmp_path):
    for r in (1, 2, 3):
        _write_round(tmp_path, r, keep=2)
    rounds = sorted(p.name for p in (tmp_path / "checkpoints").glob("round-*"))
    assert rounds == ["round-000002", "round-000003"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "round-000003"
    assert ckpt.find_resumable(tmp_path) == (3, ckpt.round_dir(tmp_path, 3))


def test_truncated_newest_checkpoint_falls_back_with_warning(tmp_path):
    _write_round(tmp_path, 1)
    rdir = _write_round(tmp_path, 2)
    f = ckpt.client_file(rdir, 1)
    f.write_bytes(f.read_bytes()[:20])  # a crash mid-write on a filesystem without atomic rename
    warnings = []
    assert ckpt.find_resumable(tmp_path, warn=warnings.append) == (1, ckpt.round_dir(tmp_path, 1))
    assert len(warnings) == 1 and "client-0001.pt fails its checksum" in warnings[0]


def test_round_without_manifest_is_incomplete(tmp_path):
    _write_round(tmp_path, 1)
    rdir = ckpt.round_dir(tmp_path, 2)
    atomic_save({"round": 2}, rdir / "shared.pt")  # crashed before the others wrote
    assert ckpt.find_resumable(tmp_path, warn=lambda m: None)[0] == 1


def test_finalize_refuses_an_incomplete_round(tmp_path):
    rdir = ckpt.round_dir(tmp_path, 1)
    atomic_save({"round": 1}, rdir / "shared.pt")
    with pytest.raises(RuntimeError, match="incomplete"):
        ckpt.seal(rdir, 0, ["shared.pt", "client-0000.pt", "client-0001.pt"])


def test_safe_load_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, p)
    with pytest.raises(Exception, match="[Ww]eights only"):
        ckpt.safe_load(p)


def test_no_checkpoint_dir_means_fresh_start(tmp_path):
    assert ckpt.find_resumable(tmp_path) is None


# -- issue 12: damaged side files, parts per rank -----------------------------------------------------------
def test_stray_folders_are_reported_never_read_or_pruned(tmp_path):
    _write_round(tmp_path, 1)
    stray = tmp_path / "checkpoints" / "round-000004.bak"
    stray.mkdir()
    (tmp_path / "checkpoints" / "round-xyz").mkdir()
    warnings = []
    assert ckpt.find_resumable(tmp_path, warn=warnings.append)[0] == 1
    assert sorted(w.split("/")[-1] for w in warnings) == [
        "round-000004.bak is not a round checkpoint (round-NNNNNN): ignored",
        "round-xyz is not a round checkpoint (round-NNNNNN): ignored",
    ]
    for r in (2, 3):
        _write_round(tmp_path, r, keep=1)
    assert stray.is_dir() and sorted(ckpt.round_dirs(tmp_path)) == [3]


@pytest.mark.parametrize("manifest", ["{}", "[]", '{"files": {}}', '{"files": {"../x": "0"}}', "", '{"fil'])
def test_damaged_manifest_falls_back_to_the_previous_round(tmp_path, manifest):
    _write_round(tmp_path, 1)
    rdir = _write_round(tmp_path, 2)
    ckpt.manifest_file(rdir, 0).write_text(manifest)
    warnings = []
    assert ckpt.find_resumable(tmp_path, warn=warnings.append)[0] == 1
    assert len(warnings) == 1 and "round-000002 is unusable" in warnings[0] and "MANIFEST-rank0.json" in warnings[0]


def test_latest_naming_a_missing_round_warns(tmp_path):
    _write_round(tmp_path, 1)
    (tmp_path / "checkpoints" / "latest").write_text("round-000007")
    warnings = []
    assert ckpt.find_resumable(tmp_path, warn=warnings.append)[0] == 1
    assert len(warnings) == 1 and "'round-000007'" in warnings[0]


def test_each_rank_verifies_only_the_files_it_needs(tmp_path):
    """Two ranks' parts side by side (a shared filesystem): damage to rank 1's file spoils only rank 1's part."""
    rdir = ckpt.round_dir(tmp_path, 1)
    ckpt.write_part(rdir, 0, {"shared.pt": {"round": 1}, "client-0000.pt": {"w": torch.zeros(2)}})
    ckpt.write_part(rdir, 1, {"client-0001.pt": {"w": torch.ones(2)}})
    assert ckpt.verify(rdir) is None
    f = ckpt.client_file(rdir, 1)
    f.write_bytes(f.read_bytes()[:10])
    assert ckpt.verify(rdir, ["shared.pt", "client-0000.pt"]) is None
    assert "client-0001.pt fails its checksum" in ckpt.verify(rdir, ["client-0001.pt"])
    # a part on another site (its own run directory) lists only its own files
    other = ckpt.round_dir(tmp_path / "site1", 1)
    ckpt.write_part(other, 1, {"client-0001.pt": {"w": torch.ones(2)}})
    assert ckpt.verify(other, ["client-0001.pt"]) is None
    assert "no manifest lists client-0000.pt" in ckpt.verify(other, ["client-0000.pt"])


def test_rewriting_a_round_unseals_it_until_its_new_manifest(tmp_path, monkeypatch):
    rdir = _write_round(tmp_path, 1)  # stands for the part an earlier attempt sealed
    real = ckpt.atomic_save

    def crash_on_client_1(obj, path):
        if path.name == "client-0001.pt":
            raise OSError("No space left on device")
        real(obj, path)

    monkeypatch.setattr(ckpt, "atomic_save", crash_on_client_1)
    with pytest.raises(OSError):
        ckpt.write_part(
            rdir,
            0,
            {"shared.pt": {"round": 1}, "client-0000.pt": {"w": torch.ones(3)}, "client-0001.pt": {"w": torch.ones(3)}},
        )
    assert not ckpt.manifest_file(rdir, 0).exists()  # the half-rewritten part no longer looks complete
    assert ckpt.find_resumable(tmp_path, warn=lambda m: None) is None


def test_manifest_of_older_runs_is_still_read(tmp_path):
    import json

    rdir = _write_round(tmp_path, 1)
    ckpt.manifest_file(rdir, 0).rename(rdir / ckpt.MANIFEST)
    assert json.loads((rdir / ckpt.MANIFEST).read_text())["files"]
    assert ckpt.find_resumable(tmp_path, warn=lambda m: None) == (1, rdir)
