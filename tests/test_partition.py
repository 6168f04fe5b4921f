"""fedrun.partition: invariants, hand-checked small cases, the paper's q-skew sizes, errors, CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from fedrun.info import register, run_partition
from fedrun.partition import KINDS, class_histograms, format_partition, partition


def _assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each client's indices are sorted and unique"
    allidx = np.concatenate(parts)
    assert len(allidx) == n, "no index lost or duplicated"
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


BALANCED = np.repeat(np.arange(10), 100)  # 1,000 labels, 100 per class


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3, 10])
def test_every_index_exactly_once(kind: str, k: int) -> None:
    parts = partition(BALANCED, k, kind, seed=7)
    assert len(parts) == k
    _assert_disjoint_cover(parts, len(BALANCED))


def test_iid_sizes_differ_by_at_most_one() -> None:
    # 103 = 5 * 20 + 3: the first three clients get one extra (np.array_split).
    parts = partition(np.zeros(103, dtype=int), 5, "iid")
    assert [len(p) for p in parts] == [21, 21, 21, 20, 20]


def test_iid_tiny_case_by_hand() -> None:
    # RandomState(0).permutation(6) = [5, 2, 1, 3, 0, 4] (NIID-Bench's stream); halves, then sorted.
    parts = partition(np.zeros(6, dtype=int), 2, "iid", seed=0)
    np.testing.assert_array_equal(parts[0], [1, 2, 5])
    np.testing.assert_array_equal(parts[1], [0, 3, 4])


def test_one_client_per_example() -> None:
    parts = partition(np.zeros(4, dtype=int), 4, "iid", seed=1)
    assert sorted(int(p[0]) for p in parts) == [0, 1, 2, 3]
    assert all(len(p) == 1 for p in parts)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_partition_other_seed_differs(kind: str) -> None:
    a = partition(BALANCED, 4, kind, seed=2023)
    b = partition(BALANCED, 4, kind, seed=2023)
    c = partition(BALANCED, 4, kind, seed=2024)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_quantity_skew_reproduces_the_paper_sizes() -> None:
    # Paper section 4: "At K = 5 this gave clients of 529 / 14 / 46,087 / 11,898 / 1,473 images"
    # (seed 2023, beta 0.5, 60,000 images). The Dirichlet shares times 60,000 are 529.0, 13.5,
    # 46087.0, 11897.6, 1472.8: the split has 13 where the paper rounded 13.5 up.
    parts = partition(np.zeros(60_000, dtype=int), 5, "quantity-skew", beta=0.5, seed=2023)
    assert [len(p) for p in parts] == [529, 13, 46087, 11898, 1473]


def test_quantity_skew_keeps_labels_roughly_iid() -> None:
    labels = np.repeat(np.arange(10), 1000)  # 10,000 labels, 10% per class
    parts = partition(labels, 5, "quantity-skew", beta=0.5, seed=2023)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() > 3 * sizes.min(), "quantity skew gives unequal sizes"
    hist = class_histograms(labels, parts, 10)
    big = sizes >= 1000
    assert big.sum() >= 2
    # Binomial(1000, 0.1) share has std <= 0.0095: +-0.05 is > 5 sigma, while a label skew breaks it.
    shares = hist[big] / sizes[big, None]
    assert np.all(np.abs(shares - 0.1) < 0.05), shares


def test_label_skew_skews_labels() -> None:
    parts = partition(BALANCED, 5, "label-skew", beta=0.5, seed=2023)
    hist = class_histograms(BALANCED, parts, 10)
    shares = hist / hist.sum(axis=1, keepdims=True)
    assert shares.max() > 0.3, "some class dominates some client (IID would give 0.1 each)"
    # A class's examples stay together: column sums are the class sizes.
    np.testing.assert_array_equal(hist.sum(axis=0), np.full(10, 100))


def test_label_skew_redraws_until_min_per_client() -> None:
    # Seed 2: the first draw leaves a client with 0 examples; with min_per_client=20 it is redrawn.
    first = partition(BALANCED, 10, "label-skew", beta=0.1, seed=2, min_per_client=0)
    assert min(len(p) for p in first) < 20, "precondition: the first draw is too small"
    parts = partition(BALANCED, 10, "label-skew", beta=0.1, seed=2, min_per_client=20)
    assert min(len(p) for p in parts) >= 20
    _assert_disjoint_cover(parts, len(BALANCED))


def test_quantity_skew_redraws_until_min_per_client() -> None:
    # Seed 3: the first draw gives a client 0 examples; with min_per_client=40 it is redrawn.
    first = partition(np.zeros(500, dtype=int), 5, "quantity-skew", beta=1.0, seed=3, min_per_client=0)
    assert min(len(p) for p in first) < 40, "precondition: the first draw is too small"
    parts = partition(np.zeros(500, dtype=int), 5, "quantity-skew", beta=1.0, seed=3, min_per_client=40)
    assert min(len(p) for p in parts) >= 40
    _assert_disjoint_cover(parts, 500)


def test_class_histograms_by_hand() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5])]
    np.testing.assert_array_equal(class_histograms(labels, parts, 3), [[1, 1, 0], [0, 1, 3]])
    np.testing.assert_array_equal(class_histograms(labels, parts, 4), [[1, 1, 0, 0], [0, 1, 3, 0]])
    with pytest.raises(ValueError, match="num_classes=2"):
        class_histograms(labels, parts, 2)


def test_format_partition_by_hand() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    text = format_partition([np.array([0, 1]), np.array([2, 3, 4, 5])], labels, 3)
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()[:1].isalnum()}
    assert rows["0"][:3] == ["0", "2", "33.3%"] and rows["0"][-3:] == ["1", "1", "0"]
    assert rows["1"][:3] == ["1", "4", "66.7%"] and rows["1"][-3:] == ["0", "1", "3"]
    assert rows["total"][:3] == ["total", "6", "100.0%"] and rows["total"][-3:] == ["1", "2", "3"]
    assert "c0" in text and "c2" in text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_clients=2, kind="dirichlet"), r"'dirichlet'.*iid, label-skew, quantity-skew"),
        (dict(num_clients=0, kind="iid"), r"num_clients=0.*>= 1"),
        (dict(num_clients=11, kind="iid"), r"num_clients=11.*10 examples"),
        (dict(num_clients=2, kind="label-skew", beta=0.0), r"beta=0.0.*> 0"),
        (
            dict(num_clients=3, kind="quantity-skew", min_per_client=4),
            r"min_per_client=4.*3 clients x 4 > 10",
        ),
    ],
)
def test_bad_input_is_one_clear_line(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        partition(np.zeros(10, dtype=int), **kwargs)
    assert "\n" not in str(e.value)


def test_gives_up_after_max_draws() -> None:
    # 10 clients x exactly 10 of 100 examples: Dirichlet(0.01) never draws that.
    with pytest.raises(ValueError, match=r"could not give each of 10 clients >= 10 of 100 examples in 50 draws"):
        partition(np.zeros(100, dtype=int), 10, "quantity-skew", beta=0.01, min_per_client=10, max_draws=50)


# ---------------------------------------------------------------------------------------------
# CLI


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedrun")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_json_gives_the_paper_sizes(fmnist_root, capsys) -> None:
    args = _parse(
        [
            "partition",
            "--dataset",
            "fashion-mnist",
            "--clients",
            "5",
            "--partition",
            "quantity-skew",
            "--beta",
            "0.5",
            "--seed",
            "2023",
            "--data-root",
            str(fmnist_root),
            "--json",
        ]
    )
    assert args.func is run_partition
    assert run_partition(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sizes"] == [529, 13, 46087, 11898, 1473]
    hist = np.array(out["class_histograms"])
    assert hist.shape == (5, 10)
    np.testing.assert_array_equal(hist.sum(axis=1), out["sizes"])
    np.testing.assert_array_equal(hist.sum(axis=0), np.full(10, 6000))  # Fashion-MNIST: 6,000 per class


def test_cli_table(fmnist_root, capsys) -> None:
    args = _parse(
        [
            "partition",
            "--clients",
            "3",
            "--partition",
            "label-skew",
            "--subset",
            "3000",
            "--data-root",
            str(fmnist_root),
        ]
    )
    assert run_partition(args) == 0
    out = capsys.readouterr().out
    assert "fashion-mnist: 3000 examples over 3 clients, partition=label-skew beta=0.5 seed=2023" in out
    total = next(line for line in out.splitlines() if line.split()[:1] == ["total"])
    assert total.split()[1:3] == ["3000", "100.0%"]
    client_rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert len(client_rows) == 3
    assert sum(int(r[1]) for r in client_rows) == 3000
    assert all(int(r[1]) >= 10 for r in client_rows)


def test_cli_missing_data_is_an_error_message(tmp_path, capsys) -> None:
    args = _parse(["partition", "--data-root", str(tmp_path)])
    assert run_partition(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("fedrun partition: error: Fashion-MNIST not found under")
    assert "train-labels-idx1-ubyte" in err and "Traceback" not in err


def test_cli_defaults_read_data_root_from_fedrun_data(monkeypatch, fmnist_root, capsys) -> None:
    monkeypatch.setenv("FEDRUN_DATA", str(fmnist_root))
    args = _parse(["partition", "--subset", "101", "--json"])
    defaults = (args.dataset, args.clients, args.partition, args.beta, args.seed, args.data_root)
    assert defaults == ("fashion-mnist", 2, "iid", 0.5, 2023, None)
    assert run_partition(args) == 0
    assert json.loads(capsys.readouterr().out)["sizes"] == [51, 50]
