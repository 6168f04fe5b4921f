"""evaluation.kid and the features behind it: KID by hand, of identical sets, against an independent numpy
implementation on real Fashion-MNIST features; statistics files with and without features; `fedrun fid`'s KID."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation import fid as F
from evaluation import kid as K
from evaluation.metrics import score_features
from fedrun.cli import main as fedrun_main


def inception_like(rng: np.random.Generator, n: int, d: int = 2048) -> np.ndarray:
    """Non-negative features shaped like pytorch-fid's pool3 ones on Fashion-MNIST (measured on 40 test images:
    x.x/d about 0.24, x.y/d about 0.16): a mean per dimension shared by all images, times noise per image."""
    per_dim = rng.gamma(0.8, 0.35, size=d)
    return per_dim * rng.gamma(2.0, 0.5, size=(n, d))


# -- the estimator ---------------------------------------------------------------------------------


def test_hand_computed_3_plus_3_vectors_in_4_dimensions():
    """k(a, b) = (a.b / 4 + 1)^3. X: x1.x2 = 0 -> 1, x1.x3 = 4 -> 8, x2.x3 = 4 -> 8; off-diagonal sum 2 * 17 = 34,
    / (3 * 2) = 17/3. Y: y1.y2 = 0 -> 1, y1.y3 = 4 -> 8, y2.y3 = 0 -> 1; 2 * 10 / 6 = 10/3. X.Y: x1.y3 = x3.y3 = 4
    -> 8, the other seven products 0 -> 1; 2 * 23 / 9 = 46/9. MMD^2 = 17/3 + 10/3 - 46/9 = 35/9."""
    x = np.array([[2, 0, 0, 0], [0, 2, 0, 0], [2, 2, 0, 0]], dtype=np.float64)
    y = np.array([[0, 0, 2, 0], [0, 0, 0, 2], [2, 0, 2, 0]], dtype=np.float64)
    assert K.polynomial_kernel(x, x)[2, 2] == 27.0  # (8 / 4 + 1)^3, on the diagonal the estimator leaves out
    assert K.polynomial_kernel(x, y)[0, 2] == 8.0
    assert K.mmd2_unbiased(x, y) == pytest.approx(35 / 9, abs=1e-12)
    # Subsets of min(3, 3, 1000) = 3: every subset is all of both sets, so every draw gives 35/9.
    k = K.kid(x, y)
    assert (k.subsets, k.subset_size) == (K.KID_SUBSETS, 3)
    assert k.mean == pytest.approx(35 / 9, abs=1e-12) and k.std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n,subsets", [(1000, K.KID_SUBSETS), (3000, 10)])
def test_identical_feature_sets_give_about_zero(n, subsets):
    """n = 1000: every subset is the whole set; n = 3000: subsets of 1000 drawn apart from the same pool (10 of
    them: each costs three 1000 x 1000 kernel blocks)."""
    feats = inception_like(np.random.default_rng(n), n)
    k = K.kid(feats, feats.copy(), subsets=subsets)
    assert abs(k.mean) < 1e-3
    assert k.subset_size == 1000
    # A real difference is far above that: the same features 20 % brighter.
    assert K.kid(1.2 * feats, feats, subsets=subsets).mean > 0.02


def _plain_kid(fake, real, subsets, size, seed=K.KID_SEED):
    """Every subset scored from scratch, the subsets drawn as torch-fidelity draws them."""
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        f = fake[rng.choice(len(fake), size, replace=False)]
        r = real[rng.choice(len(real), size, replace=False)]
        values.append(K.mmd2_unbiased(f, r))
    return np.mean(values), np.std(values)


@pytest.mark.parametrize("n_fake,n_real", [(30, 30), (30, 70), (70, 30), (50, 70)])
def test_whole_set_shortcuts_equal_scoring_every_subset(n_fake, n_real):
    """With a whole set (N = subset size) its sums are computed once; the numbers are those of scoring every
    subset from scratch (subset size 30, or 50 where neither set is whole)."""
    rng = np.random.default_rng(n_fake + n_real)
    fake, real = 1.1 * inception_like(rng, n_fake, 32), inception_like(rng, n_real, 32)
    size = min(n_fake, n_real)
    got = K.kid(fake, real, subsets=7)
    mean, std = _plain_kid(fake, real, 7, size)
    assert got.subset_size == size
    assert got.mean == pytest.approx(mean, rel=1e-10)
    assert got.std == pytest.approx(std, rel=1e-6, abs=1e-12)


def test_subsets_are_seeded_and_sized_by_the_smaller_set():
    rng = np.random.default_rng(1)
    a, b = inception_like(rng, 60, 64), inception_like(rng, 40, 64) * 1.05
    first, again = K.kid(a, b), K.kid(a, b)
    assert first == again  # a fixed seed: the same number every time
    assert first.subset_size == 40 and first.std > 0  # min(60, 40, 1000); subsets of a differ
    assert K.kid(a, b, seed=K.KID_SEED + 1).mean != first.mean
    assert K.kid(a, b, subset_size=10).subset_size == 10
    with pytest.raises(ValueError, match="at least 2"):
        K.mmd2_unbiased(a[:1], b)
    with pytest.raises(ValueError, match="mismatched"):
        K.kid(a, b[:, :10])


# -- statistics files with and without features ----------------------------------------------------


def test_statistics_file_keeps_the_features_and_pytorch_fid_still_reads_it(tmp_path):
    from pytorch_fid.fid_score import compute_statistics_of_path

    feats = inception_like(np.random.default_rng(2), 30, 16)
    ref = F.Reference.of_features(feats)
    path = F.save_reference(tmp_path / "ref.npz", ref)
    back = F.load_reference(path)
    assert back.features.dtype == np.float32 and back.n == 30 and back.no_kid == ""
    np.testing.assert_array_equal(back.features, feats.astype(np.float32))
    np.testing.assert_array_equal(back.mu, ref.mu)
    m, s = compute_statistics_of_path(str(path), None, 50, 2048, "cpu")  # pytorch-fid ignores the features
    np.testing.assert_array_equal(m, ref.mu)
    np.testing.assert_array_equal(s, ref.sigma)


def test_mu_sigma_only_file_gives_fid_and_says_kid_needs_features(tmp_path):
    rng = np.random.default_rng(3)
    feats, samples = inception_like(rng, 30, 16), inception_like(rng, 20, 16)
    ref = F.Reference.of_features(feats)
    path = F.save_stats(tmp_path / "pf.npz", ref.mu, ref.sigma)  # what pytorch-fid's --save-stats writes
    plain = F.load_reference(path)
    assert plain.features is None and "KID needs the reference's Inception features" in plain.no_kid
    assert "fedrun fid --save-stats" in plain.no_kid
    scores = score_features(samples, plain)
    assert scores.kid is None and scores.no_kid == plain.no_kid
    assert scores.fid == pytest.approx(F.frechet_distance(*F.statistics(samples), *ref.stats), rel=1e-12)
    full = score_features(samples, ref)
    assert full.fid == pytest.approx(scores.fid, rel=1e-12) and full.kid == K.kid(samples, ref.features)
    assert full.record() == {"fid": full.fid, "kid": full.kid.mean, "kid_std": full.kid.std, "kid_subset_size": 20}


def test_fid_command_prints_kid_then_fid_and_save_stats_keeps_features(tmp_path, capsys, monkeypatch):
    """Two statistics files with features: no Inception weights needed at all, KID from the stored features
    (64-d stand-ins for the 2048-d ones: the files and the maths do not depend on d)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    rng = np.random.default_rng(4)
    a, b = inception_like(rng, 25, 64), 1.05 * inception_like(rng, 30, 64)
    pa = F.save_reference(tmp_path / "a.npz", F.Reference.of_features(a))
    pb = F.save_reference(tmp_path / "b.npz", F.Reference.of_features(b))
    assert fedrun_main(["fid", str(pa), str(pb), "--device", "cpu"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    expected = K.kid(a.astype(np.float32), b.astype(np.float32))
    assert out[0].startswith(f"KID: {expected.mean:.5f} ± {expected.std:.5f} (100 subsets of 25)")
    assert out[-1].startswith("FID:")  # last, as pytorch-fid prints it
    assert float(out[-1].split("FID:")[1]) == pytest.approx(
        F.frechet_distance(*F.statistics(a), *F.statistics(b)), rel=1e-6
    )

    # --save-stats of a source with features keeps them; --no-features writes mu and sigma only.
    assert fedrun_main(["fid", "--save-stats", str(pa), str(tmp_path / "copy.npz")]) == 0
    assert "statistics and features of 25 images" in capsys.readouterr().err
    assert F.load_reference(tmp_path / "copy.npz").features.shape == (25, 64)
    assert fedrun_main(["fid", "--save-stats", "--no-features", str(pa), str(tmp_path / "small.npz")]) == 0
    assert F.load_reference(tmp_path / "small.npz").features is None
    capsys.readouterr()
    assert fedrun_main(["fid", str(tmp_path / "small.npz"), str(pb)]) == 0
    out, err = capsys.readouterr()
    assert "KID:" not in out and out.startswith("FID:") and "KID needs" in err


def test_help_says_where_kid_features_come_from(capsys):
    for cmd in ("eval", "fid"):
        with pytest.raises(SystemExit):
            fedrun_main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "KID needs the reference's Inception features" in text and "fedrun fid --save-stats" in text


# -- the check against an independent implementation on real images --------------------------------


def _numpy_kid_all(x: np.ndarray, y: np.ndarray) -> float:
    """Binkowski et al.'s unbiased MMD^2 with k = (x.y/d + 1)^3, written out with masks (no code shared)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    d = x.shape[1]
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    off_x, off_y = ~np.eye(len(x), dtype=bool), ~np.eye(len(y), dtype=bool)
    return float(kxx[off_x].mean() + kyy[off_y].mean() - 2 * kxy.mean())


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 400 images through Inception (``real_200``, shared with the FID parity test)
def test_kid_of_200_train_vs_200_test_images_equals_an_independent_numpy_kid(real_200):
    """Subsets of min(200, 200, 1000) = 200 are all of both sets, and MMD^2 does not depend on their order, so
    every subset gives the full-set value that the independent implementation computes."""
    train, test = real_200
    assert train.features.shape == test.features.shape == (200, 2048)
    ours = K.kid(train.features, test.features)
    theirs = _numpy_kid_all(train.features, test.features)
    assert ours.subset_size == 200
    assert ours.mean == pytest.approx(theirs, abs=1e-6)
    assert ours.std < 1e-6
    assert abs(ours.mean) < 0.02  # two samples of the same data set: near 0, unlike FID's ~60 here
