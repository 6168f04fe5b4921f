"""The precision of the local step (``optim.amp``): chosen by one rule, said once, the same at every resume.

``fp32`` and ``bf16`` mean what they say. ``auto`` picks bf16 autocast where it was measured faster than fp32 and
fp32 everywhere else:

- on a GPU: bf16 (tensor cores);
- on a CPU with AMX (``amx_bf16`` in /proc/cpuinfo: Intel Xeon since Sapphire Rapids) and images of at least
  ``MIN_CPU_BF16_IMAGE`` pixels a side: bf16. On such a Xeon (2 cores) bf16 autocast ran the paper UNet's step
  (28x28) 1.25-1.6x faster than fp32 from batch 8 to 64, 1.06x at batch 2, 1.3x at 24x24 and 32x32 (BENCHMARKS.md);
- on that CPU with smaller images: fp32. At 16x16 and 20x20 bf16 was slower as often as faster (0.73-1.41x): the
  step is too small for AMX to pay for the casts every time;
- on a CPU with ``avx512_bf16`` but no AMX (AMD EPYC Zen 4): fp32. Without AMX's tile units the bf16 dot
  products run on the same vector units as fp32, and the developers measured no gain on such an EPYC;
- on any other CPU: fp32 (no native bf16: autocast would emulate it, slower).

The rule reads only the CPU's flags and the config, never a timing: two runs of one config on one machine, and a
run and its resume, always train in the same precision (bit-identical resume), however loaded the machine is.
A resume on other hardware may change it, like ``--set optim.amp=...`` may (``rundir.RESUMABLE_CHANGES``); the
run's log has the line ``describe`` writes at every start.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedrun.sections import AMP_DTYPES

MIN_CPU_BF16_IMAGE = 28
"""Smallest image side (pixels) at which ``auto`` picks bf16 on an AMX CPU (measured, see the module docstring)."""

AMX_FLAG, AVX512_BF16_FLAG = "amx_bf16", "avx512_bf16"


@dataclass(frozen=True)
class AmpChoice:
    """The precision of one rank's local step and why."""

    mode: str
    """``optim.amp`` as configured (one of ``AMP_DTYPES``)."""
    precision: str
    """What the step runs: "bf16" (autocast) or "fp32"."""
    why: str
    """The reason, for the log line."""

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype; None = fp32, no autocast."""
        return torch.bfloat16 if self.precision == "bf16" else None

    def describe(self) -> str:
        """One line for the run's log: 'precision: bf16 autocast (optim.amp=auto: ...; --set optim.amp=...)'."""
        what = "bf16 autocast" if self.precision == "bf16" else "fp32"
        other = "fp32" if self.precision == "bf16" else "bf16"
        return f"precision: {what} (optim.amp={self.mode}: {self.why}; --set optim.amp={other} changes it)"


def choose_amp(mode: str, device_type: str, cpu_flags: Iterable[str] = (), image_size: int | None = None) -> AmpChoice:
    """The precision for ``optim.amp=mode`` on a device of ``device_type`` ("cuda", "cpu", ...), given the CPU's
    flags (/proc/cpuinfo) and the image side (None = unknown: treated as large enough). A pure function."""
    if mode not in AMP_DTYPES:
        raise ValueError(f"invalid optim.amp={mode!r}: allowed: {', '.join(AMP_DTYPES)}")
    if mode != "auto":
        return AmpChoice(mode, mode, "as configured")
    if device_type == "cuda":
        return AmpChoice(mode, "bf16", "a GPU")
    if device_type != "cpu":
        return AmpChoice(mode, "fp32", f"no measured bf16 gain on {device_type}")
    flags = set(cpu_flags)
    if AMX_FLAG in flags:
        if image_size is not None and image_size < MIN_CPU_BF16_IMAGE:
            return AmpChoice(
                mode, "fp32", f"this CPU has AMX, but at {image_size}x{image_size} bf16 was not faster than fp32"
            )
        return AmpChoice(mode, "bf16", "this CPU has AMX (amx_bf16), where bf16 was measured 1.06-1.6x faster")
    if AVX512_BF16_FLAG in flags:
        return AmpChoice(mode, "fp32", "this CPU has avx512_bf16 but no AMX, where bf16 was not faster")
    return AmpChoice(mode, "fp32", "this CPU has no native bf16")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The flags of the first processor in ``cpuinfo`` (None = read /proc/cpuinfo; empty where there is none,
    e.g. macOS, which then counts as a CPU without native bf16)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def amp_choice(mode: str, device: torch.device, image_size: int | None = None) -> AmpChoice:
    """``choose_amp`` with this machine's CPU flags."""
    return choose_amp(mode, device.type, cpu_flags() if device.type == "cpu" else (), image_size)
