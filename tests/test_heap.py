"""fedrun.heap: FEDRUN_HEAP's rule, its lines, and what it does to a real process's page faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fedrun.heap import ENV, HeapChoice, HeapError, choose_mode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    ("value", "mode"), [(None, "keep"), ("", "keep"), ("keep", "keep"), (" System ", "system"), ("system", "system")]
)
def test_mode_comes_from_the_environment(value, mode):
    env = {} if value is None else {ENV: value}
    assert choose_mode(env) == mode


def test_a_bad_mode_is_one_line_naming_it_and_the_allowed_ones():
    with pytest.raises(HeapError, match=r"^invalid FEDRUN_HEAP='mmap': allowed: keep, system$"):
        choose_mode({ENV: "mmap"})


def test_lines_say_what_was_done_and_how_to_change_it():
    on = HeapChoice("keep", True, "glibc: M_MMAP_MAX=0, M_TRIM_THRESHOLD=max").describe()
    assert on.startswith("host memory: malloc keeps freed memory for reuse (glibc:") and "FEDRUN_HEAP=system" in on
    off = HeapChoice("system", False, "FEDRUN_HEAP=system").describe()
    assert off == "host memory: malloc's defaults (FEDRUN_HEAP=system)"


def test_without_glibc_or_with_system_nothing_is_set_and_the_line_says_why(monkeypatch):
    from fedrun import heap

    monkeypatch.setattr(heap, "_glibc", lambda: None)  # musl, macOS: no gnu_get_libc_version
    monkeypatch.setattr(heap, "_CURRENT", None)
    choice = heap.apply_heap({})
    assert (choice.mode, choice.applied) == ("keep", False) and heap.current() is choice
    assert choice.describe() == "host memory: malloc's defaults (not glibc's malloc here: nothing to set)"
    assert heap.apply_heap({ENV: "system"}) is choice  # once per process: the first choice stands
    monkeypatch.setattr(heap, "_CURRENT", None)
    assert heap.apply_heap({ENV: "system"}).describe() == "host memory: malloc's defaults (FEDRUN_HEAP=system)"


CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from fedrun import heap
    choice = heap.apply_heap()
    faults = []
    for _ in range(15):  # what a step does to its activations: allocate, write, free
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB
        del x
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    faults = sum(faults[10:])  # the steady state: the last five (glibc's heap settled within 7 blocks here)
    print(json.dumps({"applied": choice.applied, "faults": faults, "line": choice.describe()}))
    """
)


def _child(mode: str) -> dict:
    env = {**os.environ, ENV: mode, "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux")
def test_keep_reuses_freed_tensors_memory_instead_of_faulting_it_in_again():
    system, keep = _child("system"), _child("keep")
    assert not system["applied"] and keep["applied"], keep["line"]
    pages = 64 * 2**20 // 4096  # one 64 MiB block
    assert system["faults"] >= 4 * pages  # glibc's default: a fresh mmap, faulted in, every time
    assert keep["faults"] <= pages // 2  # kept: the pages of an earlier block serve again


def test_the_fedrun_program_refuses_a_bad_mode_before_anything_runs():
    env = {**os.environ, ENV: "bogus"}
    out = subprocess.run(
        [sys.executable, "-m", "fedrun", "config", "--preset", "tiny"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == "fedrun: error: invalid FEDRUN_HEAP='bogus': allowed: keep, system"
