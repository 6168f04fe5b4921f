"""evaluation.fid: Fréchet distance in closed form, pytorch-fid parity, statistics files, sources, weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import fid as F
from evaluation import inception as Inc
from evaluation import reference as Ref
from evaluation import sources as Src
from evaluation.errors import SourceError


def _spd(rng: np.random.Generator, d: int, n: int | None = None) -> np.ndarray:
    """A random symmetric PSD matrix: a sample covariance of n points (singular when n <= d)."""
    x = rng.normal(size=(n or 3 * d, d)) * rng.uniform(0.5, 2.0, size=d)
    return np.cov(x, rowvar=False)


def _pytorch_fid_distance(*args) -> float:
    """pytorch-fid's own function, where this SciPy still accepts sqrtm(..., disp=False)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    try:
        return float(calculate_frechet_distance(*args))
    except TypeError as e:  # SciPy >= 1.18 removed `disp`
        if "disp" in str(e):
            pytest.skip("pytorch-fid's calculate_frechet_distance does not run on this SciPy")
        raise


# -- Fréchet distance -------------------------------------------------------------------------------


@pytest.mark.parametrize("d,n", [(40, None), (512, 4)])
def test_identical_statistics_give_zero(d, n):
    """Also for a singular covariance (4 images, 509 zero eigenvalues), where the square roots of
    rounding-level eigenvalues would add up unless they are treated as the zeros they are."""
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=d), _spd(rng, d, n)
    assert abs(F.frechet_distance(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)
    assert abs(F.frechet_distance(mu, sigma, mu, sigma, method="sqrtm")) < 1e-4 * np.trace(sigma)


def test_diagonal_covariances_match_the_closed_form():
    # By hand: |mu1-mu2|^2 = 1 + 4 = 5; sum(s1 + s2 - 2 sqrt(s1 s2)) = (1+4-4) + (4+9-12) = 2 -> 7.
    mu1, mu2 = np.array([0.0, 0.0]), np.array([1.0, 2.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 9.0])
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(7.0, abs=1e-12)
    # A larger random diagonal case against the same formula.
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, 50), rng.uniform(0.1, 3.0, 50)
    m1, m2 = rng.normal(size=50), rng.normal(size=50)
    expected = np.sum((m1 - m2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    for method in ("eigh", "sqrtm"):
        got = F.frechet_distance(m1, np.diag(a), m2, np.diag(b), method=method)
        assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
@pytest.mark.parametrize(
    "d,n1,n2", [(8, None, None), (64, None, None), (64, 40, 40), (300, 120, 120), (300, 120, None), (300, None, 50)]
)
def test_agrees_with_pytorch_fid(d, n1, n2):
    """Random SPD matrices, including singular sample covariances (fewer points than dimensions, as with
    200 images of 2048-d features) on one side (Cholesky path) or both (eigen-decomposition path)."""
    rng = np.random.default_rng(d + (n1 or 0) + 7 * (n2 or 0))
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d) + 0.3
    s1, s2 = _spd(rng, d, n1), 1.7 * _spd(rng, d, n2)
    ref = _pytorch_fid_distance(mu1, s1, mu2, s2)
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    assert F.frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(ref, rel=1e-9)


def test_mismatched_shapes_are_an_error():
    with pytest.raises(ValueError, match="mismatched"):
        F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# -- statistics files: either tool reads the other's ----------------------------------------------


def test_project_stats_file_is_read_by_pytorch_fid(tmp_path):
    from pytorch_fid.fid_score import compute_statistics_of_path

    rng = np.random.default_rng(2)
    mu, sigma = rng.normal(size=16), _spd(rng, 16)
    path = F.save_stats(tmp_path / "ref.npz", mu, sigma, n=48)
    m, s = compute_statistics_of_path(str(path), None, 50, 2048, "cpu")  # .npz: read, no model needed
    np.testing.assert_array_equal(m, mu)
    np.testing.assert_array_equal(s, sigma)
    assert Src.parse_source(str(path)).kind == "stats"


def _write_pngs(folder, images: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img[0].numpy(), mode="L").save(folder / f"{i:05d}.png")


def test_pytorch_fid_stats_file_is_read_by_the_project(tmp_path, torch_home, monkeypatch):
    """pytorch-fid's --save-stats output (mu/sigma .npz) loads here, and equals our in-memory statistics of
    the same images (a small parity check of the whole feature pipeline)."""
    from pytorch_fid.fid_score import save_fid_stats

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8, generator=g)
    _write_pngs(tmp_path / "imgs", images)
    out = tmp_path / "pf_stats.npz"
    save_fid_stats([str(tmp_path / "imgs"), str(out)], batch_size=6, device="cpu", dims=2048, num_workers=0)

    src = Src.parse_source(str(out))
    assert src.kind == "stats"
    mu_pf, sigma_pf = F.load_stats(out)
    mu, sigma = F.statistics(Inc.inception_features(images, batch_size=6))
    assert mu_pf.shape == (2048,) and sigma_pf.shape == (2048, 2048)
    np.testing.assert_allclose(mu, mu_pf, atol=1e-5)
    np.testing.assert_allclose(sigma, sigma_pf, atol=1e-5)


def test_load_stats_rejects_an_images_npz(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 1, 4, 4), np.uint8))
    with pytest.raises(SourceError, match="mu and sigma"):
        F.load_stats(tmp_path / "x.npz")


# -- input conversion and sources -------------------------------------------------------------------


def test_grey_input_matches_pil_rgb_conversion(tmp_path):
    """What pytorch-fid feeds the network for a grey PNG (PIL convert('RGB') / 255) equals ours."""
    g = torch.Generator().manual_seed(1)
    img = torch.randint(0, 256, (1, 1, 9, 7), dtype=torch.uint8, generator=g)
    Image.fromarray(img[0, 0].numpy(), mode="L").save(tmp_path / "a.png")
    pil = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
    ours = Inc.to_inception_input(img)[0].permute(1, 2, 0).numpy()
    assert ours.shape == (9, 7, 3)
    np.testing.assert_array_equal(ours, pil)
    with pytest.raises(SourceError):
        Inc.to_inception_input(torch.zeros(1, 2, 4, 4, dtype=torch.uint8))


def test_parse_source_kinds_and_errors(tmp_path):
    (tmp_path / "folder").mkdir()
    np.savez(tmp_path / "imgs.npz", x=np.zeros((2, 1, 4, 4), np.uint8))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2), sigma=np.eye(2))
    np.savez(tmp_path / "other.npz", y=np.zeros(2))
    (tmp_path / "a.txt").write_text("x")
    assert Src.parse_source(str(tmp_path / "folder")).kind == "folder"
    assert Src.parse_source(str(tmp_path / "imgs.npz")).kind == "images"
    assert Src.parse_source(str(tmp_path / "stats.npz")).kind == "stats"
    src = Src.parse_source("fashion-mnist:test")
    assert (src.kind, src.dataset, src.split) == ("dataset", "fashion-mnist", "test")
    assert Src.parse_source("cifar10:train").split == "train"
    with pytest.raises(SourceError, match="has"):
        Src.parse_source(str(tmp_path / "other.npz"))
    with pytest.raises(SourceError, match="split"):
        Src.parse_source("mnist:val")
    with pytest.raises(SourceError, match="not an image folder"):
        Src.parse_source(str(tmp_path / "missing"))
    with pytest.raises(SourceError, match=".npz"):
        Src.parse_source(str(tmp_path / "a.txt"))
    with pytest.raises(SourceError, match="no images"):
        Src.source_statistics(str(tmp_path / "folder"))


def test_folder_and_npz_sources_give_the_same_statistics(tmp_path, torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8, generator=g)
    _write_pngs(tmp_path / "imgs", images)
    np.savez(tmp_path / "imgs.npz", x=images.numpy())
    ref_f = Src.source_statistics(str(tmp_path / "imgs"), batch_size=3, limit=4)
    ref_x = Src.source_statistics(str(tmp_path / "imgs.npz"), batch_size=4, limit=4)
    (mu_f, s_f), n_f, (mu_x, s_x), n_x = ref_f.stats, ref_f.n, ref_x.stats, ref_x.n
    assert n_f == n_x == 4  # --limit takes the first 4
    np.testing.assert_allclose(mu_f, mu_x, atol=1e-6)
    np.testing.assert_allclose(s_f, s_x, atol=1e-6)


def test_reference_statistics_cached_for_a_dataset_split(tmp_path, fmnist_root, torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    cache = tmp_path / "cache"
    (tmp_path / "a_file").write_text("")  # a cache dir below a file cannot be created: the next one is used
    mu, sigma = Ref.reference_statistics(
        "fashion-mnist:test", data_root=fmnist_root, limit=6, cache_dirs=[tmp_path / "a_file" / "sub", cache]
    ).stats
    cached = cache / "fashion-mnist_test_n6.npz"
    assert cached.is_file()
    with np.load(cached) as f:
        assert int(f["n"]) == 6

    def fail(*a, **k):
        raise AssertionError("statistics recomputed despite the cache")

    monkeypatch.setattr(Ref, "source_statistics", fail)
    mu2, sigma2 = Ref.reference_statistics(
        "fashion-mnist:test", data_root=fmnist_root, limit=6, cache_dirs=[cache]
    ).stats
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)


# -- weights ---------------------------------------------------------------------------------------


def test_missing_weights_raise_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    with pytest.raises(Inc.WeightsNotFoundError) as e:
        Inc.load_inception()
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert Inc.WEIGHTS_FILENAME in msg and Inc.WEIGHTS_URL in msg
    assert str(tmp_path / "empty_home" / "hub" / "checkpoints") in msg and "--inception-weights" in msg
    with pytest.raises(Inc.WeightsNotFoundError, match="does not exist"):
        Inc.find_inception_weights(tmp_path / "nothing.pth")


def test_explicit_weights_path_loads_without_torch_home(tmp_path, torch_home, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))  # nothing in the hub cache
    explicit = torch_home / "hub" / "checkpoints" / Inc.WEIGHTS_FILENAME
    model = Inc.load_inception(explicit)
    assert not model.training
    x = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    feats = Inc.inception_features(x, weights=explicit)
    assert feats.shape == (2, 2048) and feats.dtype == np.float64 and np.isfinite(feats).all()


# -- the parity test the issue asks for -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~3 min alone (both pipelines); far more on a shared, loaded CPU
@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")
def test_fid_200_train_vs_200_test_equals_pytorch_fid(tmp_path, fmnist_root, torch_home, real_200, monkeypatch):
    """The project's FID of 200 Fashion-MNIST train vs 200 test images (``real_200``: read as ``fedrun fid``
    reads ``fashion-mnist:train``) equals pytorch-fid's own pipeline (PNG files -> calculate_fid_given_paths)
    on the same images, to 1e-3 relative."""
    from pytorch_fid.fid_score import calculate_fid_given_paths

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    train = Src.load_dataset_images("fashion-mnist", "train", fmnist_root, limit=200)
    test = Src.load_dataset_images("fashion-mnist", "test", fmnist_root, limit=200)
    assert train.shape == test.shape == (200, 1, 28, 28)
    _write_pngs(tmp_path / "train", train)
    _write_pngs(tmp_path / "test", test)

    ref_train, ref_test = real_200
    assert ref_train.n == ref_test.n == 200
    ours = F.frechet_distance(*ref_train.stats, *ref_test.stats)
    theirs = float(
        calculate_fid_given_paths(
            [str(tmp_path / "train"), str(tmp_path / "test")], batch_size=50, device="cpu", dims=2048, num_workers=0
        )
    )
    assert ours == pytest.approx(theirs, rel=1e-3)
    assert 20 < ours < 200  # two real samples of 200: well above the 10k-sample value, far below noise
