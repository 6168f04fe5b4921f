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
depends on the process, so every rank computes the same partition from the same inputs.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

KINDS = ("iid", "label-skew", "quantity-skew")


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
    construction). Skewed kinds redraw at most ``max_draws`` times, then raise ``ValueError``.
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
        raise ValueError(f"invalid num_clients={num_clients}: more clients than the {n} examples")
    if kind != "iid":
        if not beta > 0:
            raise ValueError(f"invalid beta={beta!r}: allowed: beta > 0")
        if min_per_client < 0:
            raise ValueError(f"invalid min_per_client={min_per_client!r}: allowed: >= 0")
        if min_per_client * num_clients > n:
            raise ValueError(
                f"invalid min_per_client={min_per_client}: {num_clients} clients x {min_per_client} "
                f"> {n} examples; lower min_per_client or use fewer clients"
            )

    # Legacy RandomState, not default_rng: it reproduces NIID-Bench's (np.random.seed) partitions.
    rng = np.random.RandomState(seed)
    if kind == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif kind == "quantity-skew":
        parts = _quantity_skew(n, num_clients, beta, min_per_client, max_draws, rng)
    else:
        parts = _label_skew(labels, num_clients, beta, min_per_client, max_draws, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _give_up(kind: str, num_clients: int, n: int, beta: float, min_per_client: int, draws: int) -> ValueError:
    return ValueError(
        f"{kind} partition could not give each of {num_clients} clients >= {min_per_client} of {n} "
        f"examples in {draws} draws (beta={beta}); raise beta, lower min_per_client or use fewer clients"
    )


def _quantity_skew(
    n: int, k: int, beta: float, min_per_client: int, max_draws: int, rng: np.random.RandomState
) -> list[np.ndarray]:
    idx = rng.permutation(n)
    for _ in range(max_draws):
        p = rng.dirichlet(np.repeat(beta, k))
        cuts = (np.cumsum(p / p.sum()) * n).astype(int)[:-1]
        parts = np.split(idx, cuts)
        # NIID-Bench checks min(p * n) >= 10; checking the actual sizes is the guarantee we promise.
        if min(len(q) for q in parts) >= min_per_client:
            return parts
    raise _give_up("quantity-skew", k, n, beta, min_per_client, max_draws)


def _label_skew(
    labels: np.ndarray, k: int, beta: float, min_per_client: int, max_draws: int, rng: np.random.RandomState
) -> list[np.ndarray]:
    n = len(labels)
    classes = np.unique(labels)
    for _ in range(max_draws):
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


# ---------------------------------------------------------------------------------------------
# CLI: `fedrun partition`.


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``partition`` subcommand to ``sub`` (the result of ``parser.add_subparsers()``)."""
    from fedrun.config import default_data_root

    p = sub.add_parser(
        "partition",
        help="show how a data set is split over clients (sizes, class histograms)",
        description="Print per-client sizes and class histograms of a simulated partition.",
    )
    p.add_argument(
        "--dataset", default="fashion-mnist", choices=("fashion-mnist", "mnist", "cifar10", "celeba")
    )
    p.add_argument("--clients", type=int, default=2, help="number of clients K (default 2)")
    p.add_argument("--partition", default="iid", choices=KINDS)
    p.add_argument("--beta", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
    p.add_argument("--seed", type=int, default=2023, help="partition seed (default 2023, the paper's)")
    p.add_argument("--min-per-client", type=int, default=10, help="skewed kinds: minimum examples per client")
    p.add_argument("--subset", type=int, default=None, help="use only the first N training examples")
    p.add_argument(
        "--data-root", default=None, help=f"data root (default $FEDRUN_DATA or {default_data_root()})"
    )
    p.add_argument("--download", action="store_true", help="download a missing data set (needs internet)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``fedrun partition``: 0 on success, 1 (message on stderr) on missing data or bad input."""
    from fedrun.config import default_data_root
    from fedrun.data import DataNotFoundError, load_labels

    root = args.data_root or default_data_root()
    try:
        labels = load_labels(args.dataset, root, train=True, download=args.download)
        if args.subset is not None:
            if args.subset < 1:
                raise ValueError(f"invalid --subset={args.subset}: allowed: a positive integer")
            labels = labels[: args.subset]
        parts = partition(labels, args.clients, args.partition, args.beta, args.seed, args.min_per_client)
    except (DataNotFoundError, ValueError) as e:
        print(f"fedrun partition: error: {e}", file=sys.stderr)
        return 1
    num_classes = int(labels.max()) + 1
    hist = class_histograms(labels, parts, num_classes)
    if args.json:
        out = {
            "dataset": args.dataset,
            "partition": args.partition,
            "clients": args.clients,
            "beta": args.beta,
            "seed": args.seed,
            "min_per_client": args.min_per_client,
            "examples": len(labels),
            "sizes": [len(p) for p in parts],
            "class_histograms": hist.tolist(),
        }
        print(json.dumps(out, indent=2))
    else:
        print(
            f"{args.dataset}: {len(labels)} examples over {args.clients} clients, "
            f"partition={args.partition} beta={args.beta} seed={args.seed}"
        )
        print(format_partition(parts, labels, num_classes))
    return 0
