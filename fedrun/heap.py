"""Where this process's CPU tensors get their memory: glibc's malloc, told to keep freed memory for reuse.

torch allocates every CPU tensor with ``malloc``. By default glibc serves a block above its mmap threshold (128
KiB, rising with the blocks freed to at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``, and gives
the top of its heap back to the system beyond a trim threshold. A network frees and allocates the same
activations at every step, so each one is faulted in page by page again, step after step: Inception's at
FID's 299x299 (hundreds of MiB a batch) always, a UNet's often. In a virtual machine a page fault is costly.
``keep`` (the default) sets ``M_MMAP_MAX=0`` (every block from the heap) and ``M_TRIM_THRESHOLD`` to its
maximum (the heap is kept), so the next step reuses the pages of the last. Measured side by side in child
processes (``python -m benchmarks.bench_heap``, BENCHMARKS.md): Inception features and the UNet's forward pass
(sampling) ran 1.37x and 1.11x faster, with a thirtieth of the page faults or fewer; a training step 1.03x.

The price: the heap keeps its high-water mark. Peak RSS of the same work grew by 1-17 % (blocks that
mmap would have placed apart now share the heap), and memory freed after a peak returns to the system only
when the process ends. ``FEDRUN_HEAP=system`` leaves glibc's defaults. Only where glibc's malloc is the
allocator: elsewhere (macOS, musl) nothing is changed. Values only, no computation changes: results are
bit-identical either way.

The ``fedrun`` program (``fedrun.cli.run``, what torchrun starts) and a Slurm task apply it once at start;
``train`` logs the state with the run's other start lines.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from dataclasses import dataclass

ENV = "FEDRUN_HEAP"
MODES = ("keep", "system")
"""``keep``: freed memory stays in the heap for reuse (the default); ``system``: glibc's defaults."""

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
TRIM_MAX = 2**31 - 1  # mallopt takes an int


class HeapError(ValueError):
    """A bad ``FEDRUN_HEAP``: the message names the value and the allowed ones."""


@dataclass(frozen=True)
class HeapChoice:
    """What this process's malloc does with freed memory, and why."""

    mode: str
    """One of ``MODES``: what was asked for."""
    applied: bool
    """Whether glibc's settings were changed (``keep`` where glibc's malloc is the allocator)."""
    reason: str

    def describe(self) -> str:
        """One line for the run's log."""
        if self.applied:
            return f"host memory: malloc keeps freed memory for reuse ({self.reason}; {ENV}=system leaves it)"
        return f"host memory: malloc's defaults ({self.reason})"


_CURRENT: HeapChoice | None = None


def choose_mode(env: Mapping[str, str] | None = None) -> str:
    """``$FEDRUN_HEAP`` (empty or unset: ``keep``); anything else is a ``HeapError``."""
    env = os.environ if env is None else env
    mode = env.get(ENV, "").strip().lower() or "keep"
    if mode not in MODES:
        raise HeapError(f"invalid {ENV}={env.get(ENV)!r}: allowed: {', '.join(MODES)}")
    return mode


def _glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc (it has ``gnu_get_libc_version``), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError, TypeError):  # no such symbol (musl, macOS); no CDLL(None) (Windows)
        return None
    return libc


def apply_heap(env: Mapping[str, str] | None = None) -> HeapChoice:
    """Set this process's malloc as ``$FEDRUN_HEAP`` says (once; later calls return the first choice)."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    mode = choose_mode(env)
    if mode == "system":
        choice = HeapChoice(mode, False, f"{ENV}=system")
    elif (libc := _glibc()) is None:
        choice = HeapChoice(mode, False, "not glibc's malloc here: nothing to set")
    elif libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_MAX) == 1:
        choice = HeapChoice(mode, True, "glibc: M_MMAP_MAX=0, M_TRIM_THRESHOLD=max")
    else:  # mallopt returns 0 on an error
        choice = HeapChoice(mode, False, "glibc refused mallopt: its defaults stay")
    _CURRENT = choice
    return choice


def current() -> HeapChoice:
    """What ``apply_heap`` did in this process; glibc's defaults when it never ran (a library caller)."""
    return _CURRENT or HeapChoice("system", False, "not set by this process: fedrun sets it in its own program")
