"""FID during training (``fid_every``): through the real command line with the real scorer, and in process
with a stand-in scorer (what train() does with the factory the CLI passes)."""

from __future__ import annotations

import pytest
from cli_subprocess import TINY, run_fedrun

from fedrun.rundir import RunDir

pytestmark = pytest.mark.timeout(600)


@pytest.mark.slow
def test_fid_during_training_is_logged(repo_root, fmnist_root, torch_home, fid_stats_path, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TORCH_HOME", str(torch_home))  # the run's subprocess inherits it
    where = ["--data-root", str(fmnist_root), "--out-dir", str(tmp_path), "--name", "f"]
    fid = ["--set", "fid_every=2", "--set", "fid_samples=4", "--set", f"fid_ref={fid_stats_path}"]
    p = run_fedrun(repo_root, [*TINY, *where, "--method", "udec", *fid])
    assert "round 2: FID" in p.stderr
    acc = EventAccumulator(str(RunDir(tmp_path / "f").tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"fid/train", "fid/train/client0", "fid/train/client1"} <= tags
    assert [e.step for e in acc.Scalars("fid/train")] == [2]
    assert acc.Scalars("fid/train")[0].value > 0


def _tiny_config(fmnist_root, out_dir, **overrides):
    from fedrun.config import apply_overrides
    from fedrun.presets import get_preset

    return apply_overrides(
        get_preset("tiny"), {"federation.seed": 7, "data.root": str(fmnist_root), "out_dir": str(out_dir), **overrides}
    )


def test_fid_during_training_calls_the_factory_once_and_scores_every_model(fmnist_root, tmp_path, capsys):
    """In process, with a stand-in scorer: what train() does with the factory the CLI passes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedrun.train import train

    cfg = _tiny_config(fmnist_root, tmp_path, name="h", **{"federation.method": "udec", "fid_every": 1})
    made, seeds = [], []

    def factory(got_cfg, device, cache_dir):
        made.append((got_cfg.name, device.type, cache_dir))

        def score(model, diffusion, seed):
            assert not model.training
            seeds.append(seed)
            return 10.0 + len(seeds)

        return score

    run_dir = train(cfg, scorer_factory=factory)
    assert made == [("h", "cpu", run_dir / "eval")]  # once per rank that scores
    assert len(seeds) == 4 and seeds[:2] == seeds[2:] and seeds[0] != seeds[1]  # 2 clients x 2 rounds
    err = capsys.readouterr().err
    assert "fedrun: round 1: FID 11.50 (2 model(s)" in err and "round 2: FID 13.50" in err
    acc = EventAccumulator(str(RunDir(run_dir).tb))
    acc.Reload()
    assert [e.value for e in acc.Scalars("fid/train/client1")] == [12.0, 14.0]
    assert [e.step for e in acc.Scalars("fid/train")] == [1, 2]


def test_fid_during_training_without_a_scorer_is_a_clear_error(fmnist_root, tmp_path):
    from fedrun.config import ConfigError
    from fedrun.train import train

    with pytest.raises(ConfigError, match="FID during training needs the `fedrun train` CLI"):
        train(_tiny_config(fmnist_root, tmp_path, name="n", fid_every=2))
    assert not (tmp_path / "n").exists()  # refused before anything is written
