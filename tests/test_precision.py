"""The rule of ``optim.amp`` (fedrun.precision) on fake CPU flag sets, and where a run applies and says it."""

from __future__ import annotations

import pytest
import torch

from fedrun.config import AMP_DTYPES
from fedrun.precision import MIN_CPU_BF16_IMAGE, AmpChoice, amp_choice, choose_amp, cpu_flags

XEON_AMX = {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}  # Sapphire Rapids and later
EPYC_ZEN4 = {"avx512f", "avx512_bf16"}  # native bf16 dot products, no AMX
OLD_X86 = {"sse4_2", "avx2", "fma"}


@pytest.mark.parametrize(
    "flags, size, expected",
    [
        (XEON_AMX, 28, "bf16"),
        (XEON_AMX, 64, "bf16"),
        (XEON_AMX, None, "bf16"),
        (XEON_AMX, MIN_CPU_BF16_IMAGE - 1, "fp32"),
        (XEON_AMX, 16, "fp32"),
        (EPYC_ZEN4, 28, "fp32"),
        (OLD_X86, 28, "fp32"),
        (set(), 28, "fp32"),
    ],
)
def test_auto_on_cpu_follows_the_flags_and_the_image_size(flags, size, expected):
    choice = choose_amp("auto", "cpu", flags, size)
    assert choice.precision == expected
    assert choice.dtype == (torch.bfloat16 if expected == "bf16" else None)


def test_auto_on_a_gpu_is_bf16_whatever_the_host_cpu():
    for flags in (XEON_AMX, EPYC_ZEN4, set()):
        assert choose_amp("auto", "cuda", flags, 16).precision == "bf16"
    assert choose_amp("auto", "mps", XEON_AMX, 28).precision == "fp32"


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_an_explicit_mode_is_kept_everywhere(mode):
    for device in ("cpu", "cuda"):
        for flags in (XEON_AMX, EPYC_ZEN4, OLD_X86):
            c = choose_amp(mode, device, flags, 16)
            assert (c.mode, c.precision) == (mode, mode)


def test_a_bad_mode_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"optim.amp='fp16'.*auto, fp32, bf16"):
        choose_amp("fp16", "cpu", XEON_AMX, 28)
    assert AMP_DTYPES == ("auto", "fp32", "bf16")


def test_the_line_names_the_choice_the_reason_and_the_override():
    line = choose_amp("auto", "cpu", XEON_AMX, 28).describe()
    assert line.startswith("precision: bf16 autocast (optim.amp=auto: this CPU has AMX")
    assert line.endswith("--set optim.amp=fp32 changes it)")
    line = choose_amp("auto", "cpu", EPYC_ZEN4, 28).describe()
    assert line.startswith("precision: fp32 (optim.amp=auto:") and "no AMX" in line
    assert line.endswith("--set optim.amp=bf16 changes it)")
    assert "16x16" in choose_amp("auto", "cpu", XEON_AMX, 16).describe()


def test_cpu_flags_parses_cpuinfo():
    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx512_bf16 amx_bf16\n\nprocessor\t: 1\n"
    assert cpu_flags(text) == {"fpu", "avx512_bf16", "amx_bf16"}
    assert cpu_flags("processor\t: 0\n") == frozenset()  # no flags line (another OS's format): no native bf16


def test_amp_choice_reads_this_machine_and_is_stable():
    device = torch.device("cpu")
    first = amp_choice("auto", device, 28)
    assert isinstance(first, AmpChoice) and first.precision in ("fp32", "bf16")
    # No timing in the rule: the same answer every time (a resume trains in the run's precision).
    assert all(amp_choice("auto", device, 28) == first for _ in range(3))
    assert first == choose_amp("auto", "cpu", cpu_flags(), 28)
