"""Fetch what the tests need from outside the repository and is missing (`make test` runs this first).

Where to look is tests/conftest.py's decision (``find_fashion_mnist``, ``find_inception_weights``);
this script only fills the gaps, through the app's own download paths: torchvision's Fashion-MNIST
download (what ``fedrun train --download`` does) into the app's data root, and pytorch-fid's weights
download (what its ``fid_inception_v3()`` does on first use) into torch's hub cache. Then it computes
the reference statistics the FID tests use, once (``conftest.reference_stats``).

Offline it prints one line per missing asset and exits 0: the tests that need it skip (with CI=true
they fail) and pytest's summary says so again.

    python tests/fetch_assets.py [--data-root DIR]
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conftest as assets  # noqa: E402  (the one place that decides where the tests look)

TAG = "test assets:"
DOWNLOAD_TIMEOUT_S = 60
"""Per socket operation: a network that drops packets ends in an error, never a hang."""


def download_fashion_mnist(root: Path) -> None:
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(root), train=True, download=True)  # downloads all four files, checks their MD5s


def download_inception_weights(_torch_home: Path) -> None:
    # pytorch-fid's own call: the file lands in torch.hub.get_dir()/checkpoints, i.e. $TORCH_HOME's.
    from pytorch_fid.inception import FID_WEIGHTS_URL, load_state_dict_from_url

    load_state_dict_from_url(FID_WEIGHTS_URL, progress=True)


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())  # torchvision's download errors span several lines
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def fetch(asset: assets.Asset, download: Callable[[Path], None], find: Callable[[], assets.Asset]) -> assets.Asset:
    """The asset as found after downloading it into its target if it was missing; says what it did."""
    if asset.found is not None:
        return asset
    print(f"{TAG} downloading {asset.what} into {asset.target} (the tests need it; once)", flush=True)
    # Folders the download would create; removed again if it fails, so no empty layout is left behind.
    new_dirs = [d for d in (asset.target / asset.files[0]).parents if not d.exists()]
    try:
        download(asset.target)
    except Exception as e:  # offline, a proxy, a bad mirror: all end the same way
        for d in sorted(new_dirs, key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError:
                pass
        print(
            f"{TAG} could not download {asset.what} ({_one_line(e)}): put {asset.where_to_put()}; "
            "the tests that need it will skip (fail with CI=true)",
            flush=True,
        )
        return asset
    again = find()
    if again.found is None:
        print(f"{TAG} the download of {asset.what} did not leave {asset.where_to_put()}", flush=True)
    return again


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None, help="as pytest --data-root (default: $FEDRUN_DATA, ...)")
    args = p.parse_args(argv)
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)

    data = fetch(
        assets.find_fashion_mnist(args.data_root),
        download_fashion_mnist,
        lambda: assets.find_fashion_mnist(args.data_root),
    )
    weights = fetch(assets.find_inception_weights(), download_inception_weights, assets.find_inception_weights)
    if data.found is None or weights.found is None:
        return 0
    stats = assets.find_reference_stats()
    if stats is None:
        print(
            f"{TAG} computing FID reference statistics of {assets.STATS_IMAGES} Fashion-MNIST test images "
            f"into {assets.computed_stats_path()} (once, about a minute on CPU)",
            flush=True,
        )
        try:
            stats = assets.compute_reference_stats(data.found, weights.found)
        except Exception as e:  # the app failed: pytest's FID tests will show how
            print(f"{TAG} {_one_line(e, 400)}; the FID tests will fail", flush=True)
            return 0
    print(
        f"{TAG} Fashion-MNIST in {data.found}, FID Inception weights in {weights.found}, reference statistics {stats}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
