"""A hostile rank for tests/test_hostile_peer.py: the real ``fedrun`` CLI in this process, except that every
payload it serialises for its peers is replaced by a pickle that creates a file when it is unpickled.

    python tests/hostile_peer.py MARKER [fedrun arguments...]

A peer that unpickles what this rank sends creates MARKER on its own machine: that is the attack. The payload
is swapped where it is serialised: torch's object collectives (``_object_to_tensor``, the pickle behind
``all_gather_object`` / ``broadcast_object_list``) and fedrun.dist's JSON encoder (``_to_json_bytes``),
whichever the fedrun on ``sys.path`` has, so the same peer probes the code before and after issue 12.
The rest of the run is the honest one: the same config hash, the same collectives in the same order.
"""

from __future__ import annotations

import pickle
import sys


class Evil:
    """Unpickling this calls ``open(path, "w")``: it creates the file, on whichever machine unpickles it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def install(marker: str) -> None:
    """Swap every outgoing payload of this process for ``Evil(marker)``."""
    from torch.distributed import distributed_c10d as c10d

    honest = c10d._object_to_tensor

    def evil_object_to_tensor(obj: object, *args: object, **kwargs: object) -> object:
        return honest(Evil(marker), *args, **kwargs)

    c10d._object_to_tensor = evil_object_to_tensor

    from fedrun import dist

    if hasattr(dist, "_to_json_bytes"):
        dist._to_json_bytes = lambda value: pickle.dumps(Evil(marker))


def main() -> int:
    marker, argv = sys.argv[1], sys.argv[2:]
    install(marker)
    from fedrun.cli import main as fedrun_main

    return fedrun_main(argv)


if __name__ == "__main__":
    sys.exit(main())
