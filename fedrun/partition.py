"""How one data set is split over the clients of a simulation: pure, seeded numpy.

The three kinds follow NIID-Bench (Li et al., "Federated Learning on Non-IID Data Silos", ICDE 2022),
which the FedDiffuse paper adapts (its section 4, seed 2023, beta = 0.5):

- ``iid``: a random permutation cut into ``num_clients`` equal parts (sizes differ by at most 1).
- ``label-skew`` (NIID-Bench ``noniid-labeldir``): for every class, a Dirichlet(beta) split of its
  examples over the clients; a client that already holds >= n / K examples gets no more of later
  classes (NIID-Bench's balancing step); redrawn until every client has >= ``min_per_client``.
- ``quantity-skew`` (NIID-Bench ``iid-diff-quantity``): a random permutation cut into parts whose
  sizes are Dirichlet(beta) shares of n; redrawn until every client has >= ``min_per_client``.

The random stream is numpy's legacy ``RandomState(seed)`` drawn in NIID-Bench's order, so the same
seed gives the paper's partitions: quantity-skew, K = 5, n = 60,000, seed 2023 gives clients of
529 / 13 / 46,087 / 11,898 / 1,473 images (the paper prints the unrounded 13.5 as 14). Nothing here
depends on the process, so every rank computes the same partition from the same inputs. The command that
prints a partition, ``fedrun partition``, lives in ``fedrun.info``.
"""

from __future__ import annotations

import numpy as np

KINDS = ("iid", "label-skew", "quantity-skew")
"""The partition kinds (``data.partition`` validates against them as ``fedrun.config.PARTITIONS``)."""
EARLY_CHECK_DRAWS = 100
"""After this many failed redraws of a skewed partition, estimate whether the rest can succeed at all."""
TRIAL_DRAWS = 20_000
"""Trial draws of the client sizes alone behind that estimate (cheap: no indices are shuffled)."""


class PartitionError(ValueError):
    """The data cannot be split as asked (too few examples, an impossible skew); one line saying why."""


def partition(
    labels: np.ndarray,
    num_clients: int,
    kind: str,
    beta: float = 0.5,
    seed: int = 2023,
    min_per_client: int = 10,
    max_draws: int = 1000,
) -> list[np.ndarray]:
    """Split the indices ``0..len(labels)-1`` over ``num_clients`` clients.

    Returns one sorted int64 index array per client; every index appears in exactly one of them.
    ``min_per_client`` and ``beta`` apply to the skewed kinds only (an IID split is equal by
    construction). Skewed kinds redraw at most ``max_draws`` times, then raise ``PartitionError``; so does a
    skew that practically never succeeds, after ``EARLY_CHECK_DRAWS`` (``_practically_impossible``).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"invalid labels with shape {labels.shape}: allowed: a 1-D array")
    n = len(labels)
    if kind not in KINDS:
        raise ValueError(f"invalid partition kind {kind!r}: allowed: " + ", ".join(KINDS))
    if int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"invalid num_clients={num_clients!r}: allowed: an integer >= 1")
    num_clients = int(num_clients)
    if num_clients > n:
        raise PartitionError(f"invalid num_clients={num_clients}: more clients than the {n} examples")
    if kind != "iid":
        if not beta > 0:
            raise ValueError(f"invalid beta={beta!r}: allowed: beta > 0")
        if min_per_client < 0:
            raise ValueError(f"invalid min_per_client={min_per_client!r}: allowed: >= 0")
        if min_per_client * num_clients > n:
            raise PartitionError(
                f"invalid min_per_client={min_per_client}: {num_clients} clients x {min_per_client} "
                f"> {n} examples; lower min_per_client or use fewer clients"
            )

    # Legacy RandomState, not default_rng: it reproduces NIID-Bench's (np.random.seed) partitions.
    rng = np.random.RandomState(seed)
    if kind == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif kind == "quantity-skew":
        parts = _quantity_skew(n, num_clients, beta, min_per_client, max_draws, rng, seed)
    else:
        parts = _label_skew(labels, num_clients, beta, min_per_client, max_draws, rng, seed)
    return [np.sort(p).astype(np.int64) for p in parts]


def _give_up(
    kind: str, num_clients: int, n: int, beta: float, min_per_client: int, draws: int, trials: int = 0
) -> PartitionError:
    why = f", and none of {trials:,} trial draws of the sizes did: practically impossible" if trials else ""
    return PartitionError(
        f"{kind} partition could not give each of {num_clients} clients >= {min_per_client} of {n} "
        f"examples in {draws} draws{why} (beta={beta}); raise beta, lower min_per_client or use fewer clients"
    )


def _stop_if_hopeless(
    draw: int, max_draws: int, kind: str, class_counts: np.ndarray, k: int, beta: float, min_per_client: int, seed: int
) -> None:
    """After ``EARLY_CHECK_DRAWS`` failed draws (of more allowed), give up at once if the rest cannot succeed."""
    if draw == EARLY_CHECK_DRAWS < max_draws and _practically_impossible(
        kind, class_counts, k, beta, min_per_client, seed
    ):
        raise _give_up(kind, k, int(class_counts.sum()), beta, min_per_client, draw, trials=TRIAL_DRAWS)


def _practically_impossible(
    kind: str, class_counts: np.ndarray, k: int, beta: float, min_per_client: int, seed: int
) -> bool:
    """Whether none of ``TRIAL_DRAWS`` draws of the client sizes alone gives every client >= min_per_client.

    The sizes follow the same rule as the real draws (Dirichlet shares, NIID-Bench's balancing for
    label-skew) but skip the index shuffles, on a stream of their own: the real stream, and so the
    partition of a seed, stays NIID-Bench's. When none succeeds, the chance that the remaining real draws
    would have is small (under 2 % at the worst success rate), and the user hears so in a second, not after
    ``max_draws`` draws.
    """
    rng = np.random.default_rng(seed)
    n, chunk = int(class_counts.sum()), 2000
    for _ in range(TRIAL_DRAWS // chunk):
        if kind == "quantity-skew":
            sizes = _trial_sizes(rng.dirichlet(np.repeat(beta, k), size=chunk), n)
        else:
            sizes = np.zeros((chunk, k), dtype=np.int64)
            for n_c in class_counts:
                p = rng.dirichlet(np.repeat(beta, k), size=chunk)
                masked = p * (sizes < n / k)
                p = np.where(masked.sum(axis=1, keepdims=True) > 0, masked, p)
                sizes += _trial_sizes(p, int(n_c))
        if (sizes.min(axis=1) >= min_per_client).any():
            return False
    return True


def _trial_sizes(p: np.ndarray, n: int) -> np.ndarray:
    """Part sizes [T, K] of ``n`` items cut at the cumulative shares ``p`` [T, K], as np.split does below."""
    cuts = (np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1) * n).astype(int)[:, :-1]
    edges = np.concatenate([np.zeros((len(p), 1), dtype=int), cuts, np.full((len(p), 1), n)], axis=1)
    return np.diff(edges, axis=1)


def _quantity_skew(
    n: int, k: int, beta: float, min_per_client: int, max_draws: int, rng: np.random.RandomState, seed: int
) -> list[np.ndarray]:
    idx = rng.permutation(n)
    for draw in range(1, max_draws + 1):
        p = rng.dirichlet(np.repeat(beta, k))
        cuts = (np.cumsum(p / p.sum()) * n).astype(int)[:-1]
        parts = np.split(idx, cuts)
        # NIID-Bench checks min(p * n) >= 10; checking the actual sizes is the guarantee we promise.
        if min(len(q) for q in parts) >= min_per_client:
            return parts
        _stop_if_hopeless(draw, max_draws, "quantity-skew", np.array([n]), k, beta, min_per_client, seed)
    raise _give_up("quantity-skew", k, n, beta, min_per_client, max_draws)


def _label_skew(
    labels: np.ndarray,
    k: int,
    beta: float,
    min_per_client: int,
    max_draws: int,
    rng: np.random.RandomState,
    seed: int,
) -> list[np.ndarray]:
    n = len(labels)
    classes, counts = np.unique(labels, return_counts=True)
    for draw in range(1, max_draws + 1):
        batches: list[list[np.ndarray]] = [[] for _ in range(k)]
        sizes = np.zeros(k, dtype=np.int64)
        for c in classes:
            idx_c = np.flatnonzero(labels == c)
            rng.shuffle(idx_c)
            p = rng.dirichlet(np.repeat(beta, k))
            # Balancing step of NIID-Bench: clients already at >= n/K examples take no more.
            masked = p * (sizes < n / k)
            # Some client is always below n/K while examples remain, but with a tiny beta its
            # share can underflow to 0; then fall back to the unmasked draw rather than divide by 0.
            p = masked if masked.sum() > 0 else p
            cuts = (np.cumsum(p / p.sum()) * len(idx_c)).astype(int)[:-1]
            for j, chunk in enumerate(np.split(idx_c, cuts)):
                batches[j].append(chunk)
                sizes[j] += len(chunk)
        if sizes.min() >= min_per_client:
            return [np.concatenate(b) for b in batches]
        _stop_if_hopeless(draw, max_draws, "label-skew", counts, k, beta, min_per_client, seed)
    raise _give_up("label-skew", k, n, beta, min_per_client, max_draws)


def class_histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Examples per client and class: an int64 array [K, C], row j = bincount of client j's labels."""
    labels = np.asarray(labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"invalid labels in [{labels.min()}, {labels.max()}]: allowed: 0..{num_classes - 1} "
            f"(num_classes={num_classes})"
        )
    hist = np.zeros((len(parts), num_classes), dtype=np.int64)
    for j, p in enumerate(parts):
        hist[j] = np.bincount(labels[p], minlength=num_classes)
    return hist


def format_partition(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> str:
    """A table: one row per client (size, share of all examples, examples per class) and a total."""
    hist = class_histograms(labels, parts, num_classes)
    total = int(hist.sum())
    width = max(5, len(str(total)))
    header = f"{'client':>6}  {'size':>{width}}  {'share':>6}  | " + " ".join(
        f"{f'c{c}':>{width}}" for c in range(num_classes)
    )
    lines = [header, "-" * len(header)]

    def row(name: str, counts: np.ndarray) -> str:
        size = int(counts.sum())
        share = 100.0 * size / total if total else 0.0
        cells = " ".join(f"{int(v):>{width}}" for v in counts)
        return f"{name:>6}  {size:>{width}}  {share:>5.1f}%  | {cells}"

    lines += [row(str(j), hist[j]) for j in range(len(parts))]
    lines += ["-" * len(header), row("total", hist.sum(axis=0))]
    return "\n".join(lines)
