"""fedrun.output: the one sink of a run (null, console, TensorBoard) and the progress lines of long steps."""

from __future__ import annotations

import io

import numpy as np

from fedrun.output import ConsoleSink, Sink, TensorBoardSink, format_duration, rank_sink, steps


def test_format_duration():
    assert format_duration(0) == "00:00" and format_duration(-3) == "00:00"
    assert format_duration(75) == "01:15"
    assert format_duration(3 * 3600 + 62) == "3:01:02"


def test_rank_sink_only_rank_0_has_side_effects(tmp_path):
    assert type(rank_sink(False, tmp_path / "tb")) is Sink
    assert type(rank_sink(True)) is ConsoleSink
    assert isinstance(rank_sink(True, tmp_path / "tb"), TensorBoardSink)
    null = Sink()  # drops everything
    null.info("x")
    null.scalar("a", 1.0, 1)
    null.start_rounds(3, 0, 5)
    null.end_round(1, 0.1, 1.0, 0.1)
    null.close()


def test_console_messages_and_one_line_per_round_in_a_log_file():
    out = io.StringIO()  # not a terminal: lines, no bar
    sink = ConsoleSink(out)
    sink.info("resuming r after round 1 of 3")
    sink.warn("checkpoint x is unusable")
    sink.start_rounds(total_rounds=3, start_round=1, steps_per_round=4)
    sink.advance_steps(4)
    sink.end_round(2, loss=0.12345, images_per_s=99.0, sync_s=0.0125)
    sink.close()
    sink.info("done")  # messages still print after close
    lines = out.getvalue().splitlines()
    assert lines[0] == "fedrun: resuming r after round 1 of 3"
    assert lines[1] == "fedrun: warning: checkpoint x is unusable"
    assert lines[2].startswith("round 2/3 | loss 0.1235 | 99.0 img/s | sync 0.013s | elapsed 00:00 | ETA ")
    assert lines[3] == "fedrun: done"


def test_tensorboard_events_open_at_the_rounds_and_purge_what_is_redone(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    sink = TensorBoardSink(tb, stream=io.StringIO())
    sink.info("already finished; nothing to do")
    sink.close()
    assert not tb.exists()  # a finished run leaves no event file behind

    first = TensorBoardSink(tb, stream=io.StringIO())
    first.start_rounds(3, 0, 1)
    for r in (1, 2, 3):
        first.scalar("round/loss", float(r), r)
    first.image("samples/global", np.zeros((1, 4, 4), dtype=np.uint8), 3)
    first.close()
    resumed = TensorBoardSink(tb, stream=io.StringIO())  # resumed after round 1: rounds 2, 3 run again
    resumed.start_rounds(3, 1, 1)
    for r in (2, 3):
        resumed.scalar("round/loss", 10.0 * r, r)
    resumed.close()
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("round/loss")] == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_steps_writes_progress_lines_to_a_log_file():
    out = io.StringIO()
    with steps(5, "sampling", unit="img", stream=out, every_s=0.0) as bar:
        for _ in range(5):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("fedrun: sampling: 5/5 img (")
    assert "ETA 00:00" in lines[-1]

    quiet = io.StringIO()
    with steps(5, "sampling", stream=quiet, every_s=3600.0) as bar:
        bar.update(2)
        bar.update(3)
    assert len(quiet.getvalue().splitlines()) == 1 and "5/5" in quiet.getvalue()  # only the end

    silent = io.StringIO()
    with steps(5, "sampling", enabled=False, stream=silent) as bar:
        bar.update(5)
    assert silent.getvalue() == "" and bar.done == 5


def test_the_round_line_says_what_the_exchange_moved():
    from fedrun.comm import NO_COLLECTIVE, wire_text

    out = io.StringIO()
    sink = ConsoleSink(out)
    sink.start_rounds(total_rounds=2, start_round=0, steps_per_round=1)
    sink.end_round(1, loss=0.5, images_per_s=10.0, sync_s=0.0, comm=wire_text(0, collective=False))
    sink.end_round(2, loss=0.5, images_per_s=10.0, sync_s=0.1, comm=wire_text(3 * 2**20, collective=True))
    first, second = out.getvalue().splitlines()
    assert first.endswith(f"| {NO_COLLECTIVE}") and NO_COLLECTIVE == "no collective (1 process)"
    assert second.endswith("| all-reduce 3.00 MiB/rank")


def _events(tb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    return acc


def test_config_is_logged_once_even_when_the_first_attempt_died(tmp_path):
    run = tmp_path / "my-run"  # the run directory is the TensorBoard run: `tensorboard --logdir runs/` names it
    for attempt in (1, 2):  # attempt 1 dies in round 2, before its first checkpoint: a fresh start again
        sink = TensorBoardSink(run, stream=io.StringIO())
        sink.start_rounds(3, 0, 1)
        sink.config(
            '{"federation": {"clients": 2}}',
            {"federation.clients": 2, "model.dim_mults": None, "optim.lr": 1e-4, "data.subset": (1, 2)},
            metrics=("round/loss",),
        )
        for r in (1, 2) if attempt == 1 else (1, 2, 3):
            sink.scalar("round/loss", float(10 * attempt + r), r)
        sink.close()
    resumed = TensorBoardSink(run, stream=io.StringIO())  # a resume after round 3 logs no config
    resumed.start_rounds(4, 3, 1)
    resumed.scalar("round/loss", 24.0, 4)
    resumed.close()
    acc = _events(run)
    assert [(e.step, e.value) for e in acc.Scalars("round/loss")] == [(1, 21.0), (2, 22.0), (3, 23.0), (4, 24.0)]
    # TensorBoard's own reader (the legacy EventAccumulator above never purges text): one config, at step 0.
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    served = EventAccumulator(str(run))
    served.Reload()
    texts = served.Tensors("config/text_summary")
    assert len(texts) == 1 and texts[0].step == 0
    assert b'"clients": 2' in texts[0].tensor_proto.string_val[0]


def test_config_goes_to_tensorboards_hparams_of_the_run_itself(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    sink = TensorBoardSink(tmp_path, stream=io.StringIO())
    sink.start_rounds(1, 0, 1)
    sink.config("{}", {"federation.method": "udec", "ema": None, "compile": False}, metrics=("round/loss",))
    sink.close()
    files = sorted(tmp_path.glob("events.out.tfevents.*"))
    assert len(files) == 1 and [p for p in tmp_path.iterdir() if p.is_dir()] == []  # no sub-run
    plugins = {
        v.metadata.plugin_data.plugin_name
        for f in files
        for e in EventFileLoader(str(f)).Load()
        for v in e.summary.value
    }
    assert {"hparams", "text"} <= plugins


def test_a_repeated_eval_replaces_its_points_and_leaves_training_alone(tmp_path):
    from fedrun.rundir import RunDir

    run = RunDir(tmp_path / "r")
    train = TensorBoardSink(run.tb, stream=io.StringIO())
    train.start_rounds(3, 0, 1)
    for r in (1, 2, 3):
        train.scalar("round/loss", float(r), r)
    train.close()
    for fid in (50.0, 40.0):  # `fedrun eval` twice on the same 3-round run, as evaluation.evaluate writes it
        scores = TensorBoardSink(run.scores_tb, purge_step=3)
        scores.scalar("fid/raw", fid, 3)
        scores.close()
    assert [(e.step, e.value) for e in _events(run.scores_tb).Scalars("fid/raw")] == [(3, 40.0)]
    assert [e.step for e in _events(run.tb).Scalars("round/loss")] == [1, 2, 3]
