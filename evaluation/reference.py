"""Reference statistics of FID and KID: a statistics .npz as it is, any other source computed once and cached.

The cache holds the statistics (mu, sigma) and the Inception features behind them, which KID needs (80 MB
for 10,000 images). A cached file without features (written by a fedrun that did not store them) still gives
FID; KID then says to delete it.

The cache lives in fedrun's cache directory (``$FEDRUN_CACHE``, else ``$XDG_CACHE_HOME/fedrun``, else
``~/.cache/fedrun``), under ``fid_stats/``: never next to the data, which fedrun is only asked to read (a
read-only data root works), and shared by every run that scores against the same reference.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from evaluation.fid import Reference, load_reference, save_reference
from evaluation.sources import Source, folder_files, parse_source, source_statistics
from fedrun.output import Sink

FID_STATS_DIR = "fid_stats"


def default_cache_dir() -> Path:
    """fedrun's cache: ``$FEDRUN_CACHE``, else ``$XDG_CACHE_HOME/fedrun``, else ``~/.cache/fedrun``."""
    if os.environ.get("FEDRUN_CACHE"):
        return Path(os.environ["FEDRUN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "fedrun"


def stats_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where reference statistics are cached: ``<cache dir>/fid_stats`` (default: ``default_cache_dir()``)."""
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / FID_STATS_DIR


def reference_cache_path(
    source: Source, cache_dir: str | os.PathLike[str], limit: int | None = None, image_size: int | None = None
) -> Path:
    """Cache file for a reference's statistics: named after a dataset split, or keyed by a folder's
    (path, file names, sizes, mtimes) so a changed folder is never served stale statistics."""
    suffix = (f"_n{limit}" if limit else "") + (f"_s{image_size}" if image_size else "")
    if source.kind == "dataset":
        return Path(cache_dir) / f"{source.dataset}_{source.split}{suffix}.npz"
    h = hashlib.sha1(str(source.path.resolve()).encode())
    if source.kind == "folder":
        for f in folder_files(source.path):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        st = source.path.stat()
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return Path(cache_dir) / f"{source.path.stem}_{h.hexdigest()[:12]}{suffix}.npz"


def reference_statistics(
    ref: str,
    *,
    data_root: str | os.PathLike[str] | None = None,
    cache_dirs: Iterable[str | os.PathLike[str]] | None = None,
    limit: int | None = None,
    image_size: int | None = None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    weights: str | os.PathLike[str] | None = None,
    progress: bool = True,
    sink: Sink | None = None,
) -> Reference:
    """Statistics and features of a reference: a statistics .npz as is; anything else computed once and cached.

    The cache goes to the first writable folder of ``cache_dirs`` (None: ``stats_cache_dir()``); a cached
    file found in any of them is reused. ``sink`` hears one line before a computation that takes minutes.
    """
    src = parse_source(ref)
    if src.kind == "stats":
        return load_reference(src.path)
    dirs = [Path(d) for d in (cache_dirs if cache_dirs is not None else [stats_cache_dir()])]
    for d in dirs:
        cached = reference_cache_path(src, d, limit, image_size)
        if cached.is_file():
            return load_reference(cached, f"delete it to recompute it with the features ({src.describe()})")
    out = source_statistics(
        src,
        data_root=data_root,
        limit=limit,
        image_size=image_size,
        batch_size=batch_size,
        device=device,
        weights=weights,
        progress=progress,
        sink=sink,
    )
    for d in dirs:
        with contextlib.suppress(OSError):
            path = save_reference(reference_cache_path(src, d, limit, image_size), out)
            (sink or Sink()).info(f"cached the statistics and features of {src.describe()} in {path}")
            break
    return out
