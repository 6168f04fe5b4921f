import json

import pytest

from fedrun.args import config_from_args
from fedrun.cli import build_parser
from fedrun.config import ConfigError, RunConfig, apply_overrides, field_names
from fedrun.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_roundtrip_through_json(name):
    cfg = get_preset(name)
    assert RunConfig.from_json(cfg.to_json()) == cfg


def test_paper_preset_is_the_papers_setup():
    cfg = get_preset("paper-fmnist")
    assert (cfg.optim.batch_size, cfg.optim.lr, cfg.federation.local_epochs, cfg.federation.rounds) == (
        128,
        1e-4,
        5,
        15,
    )
    assert (cfg.diffusion.loss, cfg.diffusion.timesteps, cfg.data.beta, cfg.federation.seed) == (
        "huber",
        1000,
        0.5,
        2023,
    )
    assert cfg.optim.keep_state is False  # a fresh Adam every round, as the paper's code


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("federation.rounds", "-1", "federation.rounds=-1"),
        ("federation.method", "fedprox", "allowed: full, usplit, ulatdec, udec"),
        ("data.dataset", "imagenet", "data.dataset='imagenet'"),
        ("data.beta", "0", "data.beta=0.0"),
        ("federation.clients", "two", "expected int"),
        ("optim.ema_decay", "1.5", "optim.ema_decay"),
        ("eval_samples", "1", "allowed: 0 or >= 2"),
        ("fid_ref_num", "1", "fid_ref_num=1"),
    ],
)
def test_invalid_values_fail_with_one_line_naming_the_field(field, value, needle):
    with pytest.raises(ConfigError) as e:
        apply_overrides(get_preset("quickstart"), {field: value})
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_unknown_field_suggests_the_right_one():
    with pytest.raises(ConfigError, match="did you mean federation.rounds"):
        apply_overrides(RunConfig(), {"rounds": "3"})


def test_overrides_parse_types_and_none():
    cfg = apply_overrides(
        RunConfig(),
        {"model.dim_mults": "1,2", "data.subset": "none", "optim.keep_state": "true", "federation.local_epochs": "0.5"},
    )
    assert cfg.model.dim_mults == (1, 2) and cfg.data.subset is None
    assert cfg.optim.keep_state is True and cfg.federation.local_epochs == 0.5


def test_cli_flags_and_set_and_argv_roundtrip(tmp_path):
    p = build_parser()
    args = p.parse_args(
        [
            "train",
            "--preset",
            "tiny",
            "--method",
            "udec",
            "--clients",
            "3",
            "--set",
            "optim.ema_decay=0.99",
            "--data-root",
            str(tmp_path),
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.federation.method, cfg.federation.clients, cfg.optim.ema_decay) == ("udec", 3, 0.99)
    assert cfg.data.root == str(tmp_path)


def test_config_json_file_is_a_starting_point(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(get_preset("tiny").to_json())
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(path), "--rounds", "7"]))
    assert cfg.federation.rounds == 7 and cfg.preset == "tiny"
    assert json.loads(cfg.to_json())["federation"]["rounds"] == 7


def test_env_var_sets_default_data_root(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDRUN_DATA", str(tmp_path))
    assert RunConfig().data.root == str(tmp_path)


def test_every_field_is_reachable_by_set():
    names = field_names()
    assert "federation.method" in names and "optim.lr" in names and "model.arch" in names
    assert len(names) == len(set(names))
