"""The `fedrun` command line itself: a fast --help (no torch), --version, allowed values, one-line errors, and
the composition root's wiring (the training entry Slurm runs, the FID scorer training gets)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from fedrun.cli import build_parser, main, train_entry
from fedrun.config import DATASETS, PARTITIONS
from fedrun.methods import METHOD_NAMES
from fedrun.presets import PRESETS, get_preset

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "submitit", "scipy", "matplotlib", "tensorboard")


def _loaded_after(code: str) -> dict[str, bool]:
    """Run ``code`` in a fresh interpreter; which of HEAVY it left in sys.modules."""
    probe = f"import sys\n{code}\nprint(repr({{m: m in sys.modules for m in {HEAVY!r}}}))"
    p = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return eval(p.stdout.strip().splitlines()[-1])


def test_building_the_parser_imports_nothing_heavy():
    # The import graph, not the clock: --help must not pay torch's 8-18 s and ~650 MB.
    loaded = _loaded_after("from fedrun.cli import build_parser\nbuild_parser().format_help()")
    assert not any(loaded.values()), loaded


@pytest.mark.parametrize(
    "argv", [[], ["train"], ["config"], ["info"], ["partition"], ["submit"], ["sweep"], ["eval"], ["fid"], ["report"]]
)
def test_help_of_every_command_imports_no_torch(argv):
    code = (
        "from fedrun.cli import main\ntry:\n    main(" + repr([*argv, "--help"]) + ")\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code"
    )
    loaded = _loaded_after(code)
    assert not loaded["torch"], f"fedrun {' '.join(argv)} --help imported torch"


def test_version_comes_from_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedrun {version('fedrun')}"


def test_help_lists_the_allowed_values(capsys):
    top = build_parser().format_help()
    for name in (*METHOD_NAMES, *PARTITIONS, *DATASETS, *PRESETS):
        assert name in top, name
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens

    def listed(prefix: str, names) -> bool:
        return "".join((prefix + ", ".join(names)).split()) in train

    assert listed("sets federation.method: ", METHOD_NAMES) and listed("sets data.partition: ", PARTITIONS)
    assert listed("sets data.dataset: ", DATASETS) and listed("(default: quickstart): ", PRESETS)


@pytest.mark.parametrize(
    "field, hint",
    [
        ("optim.lrr", "did you mean optim.lr?"),
        ("federaton.method", "did you mean federation.method?"),
        ("ema", "did you mean optim.ema_decay?"),
        ("rounds", "did you mean federation.rounds?"),
    ],
)
def test_unknown_set_field_is_one_line_with_the_nearest_fields(field, hint, capsys):
    assert main(["config", "--set", f"{field}=1"]) == 2
    err = capsys.readouterr().err
    assert err == f"fedrun: error: unknown config field {field!r} ({hint})\n"


def test_unknown_preset_names_the_presets(capsys):
    assert main(["config", "--preset", "nope"]) == 2
    assert "allowed: " + ", ".join(PRESETS) in capsys.readouterr().err


def test_slurm_commands_run_the_cli_training_entry():
    for cmd in ("submit", "sweep"):
        assert build_parser().parse_args([cmd]).train_fn is train_entry


@pytest.mark.parametrize("fid_every", [0, 2])
def test_train_entry_passes_the_fid_scorer_only_when_asked(fid_every, monkeypatch, tmp_path, torch_home):
    import evaluation.scoring
    import fedrun.train

    monkeypatch.setenv("TORCH_HOME", str(torch_home))  # fid_every: the weights are looked for before training

    calls = []
    monkeypatch.setattr(
        fedrun.train, "train", lambda cfg, scorer_factory=None: calls.append(scorer_factory) or tmp_path
    )
    cfg = get_preset("tiny")
    cfg.fid_every = fid_every
    assert train_entry(cfg) == tmp_path
    assert calls == [evaluation.scoring.fid_scorer if fid_every else None]
