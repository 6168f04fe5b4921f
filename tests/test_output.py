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
