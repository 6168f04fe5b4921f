"""What a run tells its user, end to end in one process: the thread line, the round line's traffic, comm.jsonl's
flag, and TensorBoard events named after the run with the config logged once (issue 18 items 2, 6, 7)."""

from __future__ import annotations

import json

import torch

from fedrun import heap
from fedrun.comm import NO_COLLECTIVE, read_comm_log
from fedrun.config import apply_overrides
from fedrun.precision import choose_amp, cpu_flags
from fedrun.presets import get_preset
from fedrun.rundir import RunDir
from fedrun.train import train


def _events(run: RunDir):
    # TensorBoard's own reader (the server's): it also purges text, which the legacy EventAccumulator never does.
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.tb))
    acc.Reload()
    return acc


def test_single_process_run_says_what_it_did(fmnist_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    cfg = apply_overrides(
        get_preset("tiny"),
        {
            "federation.seed": 7,
            "data.root": str(fmnist_root),
            "out_dir": str(tmp_path),
            "name": "my-run",
            "federation.rounds": 1,
        },
    )
    run = RunDir(train(cfg))
    train(apply_overrides(cfg, {"federation.rounds": 2}))  # extended: a resume after round 1
    err = capsys.readouterr().err
    assert torch.get_num_threads() == before  # train() leaves its caller's setting as it found it

    # Threads: chosen on purpose, one line per start on rank 0.
    assert err.count("fedrun: 1 process x 1 thread (") == 2 and "from OMP_NUM_THREADS=1" in err
    # Precision: fedrun.precision's rule for this CPU and the model's size, said at the start and at the resume.
    expected = choose_amp("auto", "cpu", cpu_flags(), cfg.data.image_size).describe()
    assert err.count(f"fedrun: {expected}\n") == 2
    # Host memory: fedrun.heap's state of this process (conftest sets it as the fedrun program does).
    assert err.count(f"fedrun: {heap.current().describe()}\n") == 2
    # Traffic: a single process has no collective, and says so instead of '0 bytes'.
    rounds = [line for line in err.splitlines() if line.startswith("round ")]
    assert len(rounds) == 2 and all(line.endswith(f"| {NO_COLLECTIVE}") for line in rounds)
    rows = read_comm_log(run.comm_log)
    assert [(r["bytes"], r["collective"]) for r in rows] == [(0, False), (0, False)]
    # TensorBoard: the run directory is the TensorBoard run, so `tensorboard --logdir runs/` shows 'my-run'.
    assert run.tb == run.root and list(run.root.glob("events.out.tfevents.*"))
    assert f"tensorboard --logdir {tmp_path}" in err
    acc = _events(run)
    assert [e.step for e in acc.Tensors("round/loss")] == [1, 2]
    config = acc.Tensors("config/text_summary")  # once, from the fresh start; the resume logs none
    assert len(config) == 1 and config[0].step == 0
    text = config[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.removeprefix("```json\n").removesuffix("\n```"))["name"] == "my-run"
    assert "_hparams_/experiment" in acc.Tags()["tensors"]
    note = acc.Tensors("comm/bytes/text_summary")
    assert len(note) == 1 and NO_COLLECTIVE.encode() in note[0].tensor_proto.string_val[0]
