"""Bad inputs through the real command line: one `fedrun: error: ...` line, the right exit code, no traceback.

Every case runs `python -m fedrun ...` in a subprocess, as a user would, and checks: exit code 2 for a bad
input, exactly one `fedrun: error:` line on stderr naming the bad value and what is allowed, and no
"Traceback". A start that fails leaves nothing behind: no run directory skeleton, no empty data folder,
nothing outside --out-dir. Ranks that fail one another (a dead or silent peer): test_bad_peers.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_subprocess import TINY, fedrun, one_error_line

# -- a config: --config files, flags -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("{ not json", ["bad.json", "not valid JSON", "line 1, column 3"]),
        ('{"federation": {"clients": null}}', ["federation.clients=None", "expected an integer"]),
        ('{"federation": {"clients": [1, 2]}}', ["federation.clients=[1, 2]", "expected an integer"]),
        ('{"federation": {"clients": 2.5}}', ["federation.clients=2.5", "expected an integer"]),
        ('{"optim": {"lr": null}}', ["optim.lr=None", "expected a number"]),
        ('{"data": {"subset": "many"}}', ["data.subset='many'", "expected int"]),
        ('{"optim": {"keep_state": 1}}', ["optim.keep_state=1", "expected true or false"]),
        ('{"federation": null}', ["federation=None", "a JSON object of federation.* fields"]),
        ("[1, 2]", ["config=[1, 2]", "a JSON object of config sections"]),
    ],
)
def test_bad_config_file_is_one_line_naming_file_and_field(tmp_path: Path, text: str, needles: list[str]):
    path = tmp_path / "bad.json"
    path.write_text(text)
    one_error_line(fedrun("config", "--config", str(path)), 2, f"--config {path}", *needles)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--seed", "-1"], ["federation.seed=-1", "0 to 2**32 - 1"]),
        (["--clients", "2.5"], ["federation.clients='2.5'", "expected int"]),
        (["--name", "../../x"], ["name='../../x'", "inside out_dir", "no '..'"]),
        (["--name", "/tmp/elsewhere"], ["name='/tmp/elsewhere'", "not absolute"]),
        (["--set", "name=a/../../b"], ["name='a/../../b'", "no '..'"]),
        # issue 14: sampling, server optimisers, FedProx, and fields the chosen optimiser would ignore
        (["--clients", "3", "--set", "federation.sample_clients=4"], ["sample_clients=4", "federation.clients=3"]),
        (["--set", "federation.server_optimizer=adam"], ["server_optimizer='adam'", "fedavg, fedavgm, fedadam"]),
        (["--set", "federation.server_lr=0.5"], ["server_lr=0.5", "server_optimizer=fedavg", "used by fedavgm"]),
        (
            ["--set", "federation.server_optimizer=fedadam", "--set", "federation.server_momentum=0.5"],
            ["server_momentum=0.5", "server_optimizer=fedadam", "used by fedavgm, nesterov"],
        ),
        (
            ["--set", "federation.server_optimizer=fedyogi", "--set", "federation.server_betas=0.9,1"],
            ["server_betas=(0.9, 1.0)", "0 <= beta < 1"],
        ),
        (["--set", "optim.prox_mu=-0.1"], ["optim.prox_mu=-0.1", ">= 0"]),
        (["--set", "federation.error_feedback=false"], ["federation.error_feedback=False", "only int8"]),
    ],
)
def test_bad_flag_is_one_line(args: list[str], needles: list[str]):
    one_error_line(fedrun("config", *args), 2, *needles)


def test_name_may_not_leave_out_dir(tmp_path: Path, fmnist_root: Path):
    out = tmp_path / "a" / "b"
    for name in ("../../escaped", str(tmp_path / "escaped")):
        p = fedrun("train", *TINY, "--data-root", str(fmnist_root), "--out-dir", str(out), "--name", name)
        one_error_line(p, 2, f"name={name!r}")
    assert sorted(tmp_path.iterdir()) == [], "nothing written, inside or outside --out-dir"


def test_a_name_with_a_subfolder_stays_allowed():
    p = fedrun("config", "--name", "group/run-1")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["name"] == "group/run-1"


# -- data the config points to -------------------------------------------------------------------


def _image_folders(root: Path) -> str:
    from PIL import Image

    for c in (0, 1):
        (root / f"client{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("L", (28, 28), color=40 * i).save(root / f"client{c}" / f"{i}.png")
    return str(root / "client{client}")


def test_corrupt_image_names_the_file(tmp_path: Path):
    template = _image_folders(tmp_path / "images")
    bad = tmp_path / "images" / "client1" / "broken.png"
    bad.write_bytes(b"not a png")
    p = fedrun(
        "train", *TINY, "--dataset", "imagefolder", "--client-data", template, "--out-dir", str(tmp_path / "runs")
    )
    one_error_line(p, 2, f"cannot read image {bad}", "replace or remove it")
    assert not (tmp_path / "runs").exists(), "a failed start leaves no run directory"


def test_truncated_image_names_the_file(tmp_path: Path):
    template = _image_folders(tmp_path / "images")
    good = (tmp_path / "images" / "client0" / "0.png").read_bytes()
    bad = tmp_path / "images" / "client0" / "half.png"
    bad.write_bytes(good[: len(good) // 2])
    p = fedrun(
        "train", *TINY, "--dataset", "imagefolder", "--client-data", template, "--out-dir", str(tmp_path / "runs")
    )
    one_error_line(p, 2, f"cannot read image {bad}")


def test_more_clients_than_images(tmp_path: Path, fmnist_root: Path):
    p = fedrun(
        "train", *TINY, "--data-root", str(fmnist_root), "--subset", "3", "--clients", "5", "--out-dir", str(tmp_path)
    )
    one_error_line(p, 2, "federation.clients=5", "data.subset=3", "more clients than the 3 examples")
    assert sorted(tmp_path.iterdir()) == []


def test_impossible_quantity_skew_says_so_before_1000_draws(tmp_path: Path, fmnist_root: Path):
    p = fedrun(
        "train",
        *TINY,
        "--data-root",
        str(fmnist_root),
        "--subset",
        "100",
        "--clients",
        "5",
        "--partition",
        "quantity-skew",
        "--beta",
        "0.01",
        "--set",
        "data.min_per_client=15",
        "--out-dir",
        str(tmp_path),
    )
    one_error_line(
        p,
        2,
        "data.partition=quantity-skew",
        "data.beta=0.01",
        "data.min_per_client=15",
        "in 100 draws",
        "practically impossible",
        "raise beta",
    )
    assert sorted(tmp_path.iterdir()) == []


def test_impossible_label_skew_says_so_before_any_draw(tmp_path: Path, fmnist_root: Path):
    p = fedrun(
        "train",
        *TINY,
        "--data-root",
        str(fmnist_root),
        "--subset",
        "100",
        "--clients",
        "5",
        "--partition",
        "label-skew",
        "--set",
        "data.min_per_client=30",
        "--out-dir",
        str(tmp_path),
    )
    one_error_line(p, 2, "data.partition=label-skew", "5 clients x 30 > 100 examples")


@pytest.mark.parametrize(
    ("labels", "kind", "k", "min_per_client"),
    [
        ([0] * 100, "quantity-skew", 10, 10),  # 10 clients x exactly 10 of 100 with beta 0.01
        ([0] * 90 + [1] * 10, "label-skew", 5, 15),  # a class goes (nearly) whole to one client
    ],
)
def test_a_practically_impossible_skew_stops_after_100_of_1000_draws(labels, kind, k, min_per_client):
    import numpy as np

    from fedrun.partition import EARLY_CHECK_DRAWS, PartitionError, partition

    with pytest.raises(PartitionError, match=f"in {EARLY_CHECK_DRAWS} draws, and none of 20,000 trial draws"):
        partition(np.array(labels), k, kind, beta=0.01, min_per_client=min_per_client, max_draws=1000)


def test_a_rare_but_possible_skew_is_still_drawn(monkeypatch):
    """About 1 % of these draws succeed: with seed 2 the first 100 fail, the trial draws find some successes,
    and the real draws go on to one that succeeds."""
    import numpy as np

    from fedrun import partition as pt

    verdicts = []
    real = pt._practically_impossible
    monkeypatch.setattr(pt, "_practically_impossible", lambda *a: verdicts.append(real(*a)) or verdicts[-1])
    parts = pt.partition(np.zeros(1000, dtype=int), 5, "quantity-skew", beta=0.5, seed=2, min_per_client=100)
    assert verdicts == [False] and min(len(p) for p in parts) >= 100


def test_missing_data_leaves_no_run_directory(tmp_path: Path):
    p = fedrun("train", *TINY, "--data-root", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "runs"))
    one_error_line(p, 2, "Fashion-MNIST not found", str(tmp_path / "nowhere"))
    assert sorted(tmp_path.iterdir()) == [], "no run directory skeleton, no data folder"


def test_missing_inception_weights_stop_a_scored_run_before_it_trains(tmp_path: Path, fmnist_root: Path):
    """eval_samples scores the final models: without the weights the run stops at once, not after training."""
    args = ("train", *TINY, "--data-root", str(fmnist_root), "--out-dir", str(tmp_path / "runs"))
    p = fedrun(*args, "--set", "eval_samples=4", TORCH_HOME=str(tmp_path / "no-weights"))
    one_error_line(p, 2, "FID Inception weights not found", str(tmp_path / "no-weights"), "--inception-weights")
    assert sorted(tmp_path.iterdir()) == [], "nothing trained, no run directory"


def test_failed_download_leaves_no_empty_data_folder(tmp_path: Path, monkeypatch):
    """In process: torchvision makes the data set's folders, then its download fails (no internet)."""
    import torchvision.datasets as tvd

    from fedrun.data import DataNotFoundError, load_dataset

    def offline(self) -> None:
        os.makedirs(self.raw_folder, exist_ok=True)  # what torchvision's download does first
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    monkeypatch.setattr(tvd.FashionMNIST, "download", offline)
    (tmp_path / "cache").mkdir()
    with pytest.raises(DataNotFoundError, match="the download failed"):
        load_dataset("fashion-mnist", tmp_path / "cache" / "fedrun" / "data", download=True)
    assert sorted((tmp_path / "cache").iterdir()) == [], "the folders the download made are gone"


# -- the machine: CUDA, Slurm, ranks -------------------------------------------------------------


def test_device_cuda_without_cuda(tmp_path: Path, fmnist_root: Path):
    p = fedrun(
        "train",
        *TINY,
        "--data-root",
        str(fmnist_root),
        "--device",
        "cuda",
        "--out-dir",
        str(tmp_path),
        CUDA_VISIBLE_DEVICES="",
    )  # no GPU visible: what a CPU machine sees
    one_error_line(p, 2, "device='cuda'", "CUDA is not available", "allowed here: auto, cpu")
    assert sorted(tmp_path.iterdir()) == []


def _path_without_slurm(tmp_path: Path) -> str:
    """A PATH with nothing on it (no sbatch, no srun); the interpreter is called by its full path."""
    empty = tmp_path / "bin"
    empty.mkdir()
    return str(empty)


@pytest.mark.parametrize("command", [["sweep", "--grid-set", "federation.seed=1,2"], ["submit"]])
def test_dry_run_needs_no_slurm(tmp_path: Path, command: list[str]):
    p = fedrun(*command, *TINY, "--out-dir", str(tmp_path / "runs"), "--dry-run", PATH=_path_without_slurm(tmp_path))
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "#!/bin/bash" in p.stdout and "#SBATCH --ntasks-per-node=2" in p.stdout
    if command[0] == "sweep":
        assert "2 run(s)" in p.stdout and "seed-2" in p.stdout
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing"


@pytest.mark.parametrize("command", [["sweep", "--grid-set", "federation.seed=1,2"], ["submit"]])
def test_submitting_without_slurm_is_one_line(tmp_path: Path, command: list[str]):
    p = fedrun(*command, *TINY, "--out-dir", str(tmp_path / "runs"), PATH=_path_without_slurm(tmp_path))
    one_error_line(p, 2, "sbatch and srun not found on PATH", "--dry-run")
