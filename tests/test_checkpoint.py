import pytest
import torch

from fedrun import checkpoint as ckpt
from fedrun.rundir import atomic_save


def _write_round(run_dir, rnd, clients=2, keep=5):
    rdir = ckpt.round_dir(run_dir, rnd)
    atomic_save({"round": rnd}, rdir / "shared.pt")
    for k in range(clients):
        atomic_save({"w": torch.full((3,), float(rnd * 10 + k))}, ckpt.client_file(rdir, k))
    ckpt.finalize(run_dir, rnd, clients, keep)
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
        ckpt.finalize(tmp_path, 1, 2, 3)


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
