"""The one output channel of a run: messages, round progress, metrics and long-step progress.

``Sink`` is the do-nothing version (other ranks, tests); ``ConsoleSink`` prints messages and round progress
to stderr (a tqdm bar on a terminal, one line per round in a log file); ``TensorBoardSink`` adds event files.
``rank_sink`` picks the right one: only rank 0 has side effects. ``steps`` reports a long step (reference
statistics, sampling, scoring) as a bar on a terminal and as progress lines in a log file, so no long step is
ever silent.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import numpy as np


def format_duration(seconds: float) -> str:
    """``mm:ss``, or ``h:mm:ss`` from one hour."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Sink:
    """Where a run reports. This base class drops everything: the sink of ranks other than 0, and of tests."""

    def info(self, msg: str) -> None:
        """A one-line message (prefixed ``fedrun: ``)."""

    def warn(self, msg: str) -> None:
        """A one-line warning (prefixed ``fedrun: warning: ``)."""

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def image(self, tag: str, img_chw: np.ndarray, step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def config(self, text: str, fields: Mapping[str, Any], metrics: Sequence[str] = ()) -> None:
        """The run's resolved config, once per run: ``text`` (its JSON) and ``fields`` (dotted name -> value, for
        TensorBoard's hparams table, beside the scalar tags ``metrics``)."""

    def start_rounds(self, total_rounds: int, start_round: int, steps_per_round: int) -> None:
        """Rounds ``start_round + 1 .. total_rounds`` follow, of about ``steps_per_round`` local steps each."""

    def advance_steps(self, n: int) -> None:
        pass

    def end_round(self, rnd: int, loss: float, images_per_s: float, sync_s: float, comm: str = "") -> None:
        """Round ``rnd`` is over; ``comm``: what its exchange moved, in words (``fedrun.comm.wire_text``)."""

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class ConsoleSink(Sink):
    """Messages and round progress on ``stream`` (stderr): a tqdm bar on a terminal, else a line per round."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._bar: Any = None
        self._total = self._start = 0
        self._t0 = time.perf_counter()

    def info(self, msg: str) -> None:
        print(f"fedrun: {msg}", file=self.stream, flush=True)

    def warn(self, msg: str) -> None:
        print(f"fedrun: warning: {msg}", file=self.stream, flush=True)

    def start_rounds(self, total_rounds: int, start_round: int, steps_per_round: int) -> None:
        self._total, self._start, self._t0 = total_rounds, start_round, time.perf_counter()
        if self.stream.isatty() and total_rounds > start_round:
            from tqdm import tqdm

            self._bar = tqdm(
                total=(total_rounds - start_round) * steps_per_round,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
                desc=f"round {start_round + 1}/{total_rounds}",
            )

    def advance_steps(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def end_round(self, rnd: int, loss: float, images_per_s: float, sync_s: float, comm: str = "") -> None:
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / max(rnd - self._start, 1) * (self._total - rnd)
        if self._bar is not None:
            self._bar.set_description(f"round {min(rnd + 1, self._total)}/{self._total}")
            self._bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}", sync=f"{sync_s:.3f}s")
        else:
            print(
                f"round {rnd}/{self._total} | loss {loss:.4f} | {images_per_s:.1f} img/s | sync {sync_s:.3f}s | "
                f"elapsed {format_duration(elapsed)} | ETA {format_duration(eta)}" + (f" | {comm}" if comm else ""),
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class TensorBoardSink(ConsoleSink):
    """``ConsoleSink`` plus TensorBoard event files under ``log_dir``.

    The event writer opens at ``start_rounds`` (or at the first metric), never earlier, so a run that turns out
    to be finished already leaves no event file behind. ``purge_step`` drops the events at and after that step,
    which this writer then writes anew (TensorBoard honours it across event files); None = from
    ``start_rounds``: ``start_round + 1`` on a resume, 0 on a fresh start (a first attempt that died before
    its first checkpoint leaves no step behind, its config included). TensorBoard names a run after its
    folder: the run directory itself, so ``tensorboard --logdir runs/`` lists runs by their names.
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._log_dir, self._purge_step = Path(log_dir), purge_step
        self._writer: Any = None

    def _events(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # torch only where events are written

            self._writer = SummaryWriter(log_dir=str(self._log_dir), purge_step=self._purge_step)
        return self._writer

    def start_rounds(self, total_rounds: int, start_round: int, steps_per_round: int) -> None:
        super().start_rounds(total_rounds, start_round, steps_per_round)
        if self._writer is None and self._purge_step is None:
            self._purge_step = start_round + 1 if start_round else 0
        self._events()

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._events().add_scalar(tag, value, step)

    def image(self, tag: str, img_chw: np.ndarray, step: int) -> None:
        self._events().add_image(tag, img_chw, step, dataformats="CHW")

    def text(self, tag: str, text: str, step: int) -> None:
        self._events().add_text(tag, text, step)

    def config(self, text: str, fields: Mapping[str, Any], metrics: Sequence[str] = ()) -> None:
        """The config as text (tag ``config``) and as hparams of this run, at step 0: in the run's own event
        files, not the sub-run ``SummaryWriter.add_hparams`` makes."""
        from torch.utils.tensorboard.summary import hparams

        events = self._events()
        events.add_text("config", "```json\n" + text + "\n```", 0)  # Markdown: a code block keeps the layout
        # hparams takes numbers, strings and booleans: None and tuples as text.
        values = {
            k: v if isinstance(v, (bool, int, float, str)) else "none" if v is None else str(v)
            for k, v in fields.items()
        }
        for summary in hparams(values, dict.fromkeys(metrics, 0.0)):
            events.file_writer.add_summary(summary, 0)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Ends the bar and the event files; messages (``info``, ``warn``) still print afterwards."""
        super().close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def rank_sink(is_main: bool, tb_dir: Path | None = None, purge_step: int | None = None) -> Sink:
    """Rank 0: console, plus TensorBoard when ``tb_dir`` is given (``purge_step``: see ``TensorBoardSink``).
    Every other rank: the do-nothing sink."""
    if not is_main:
        return Sink()
    return TensorBoardSink(tb_dir, purge_step) if tb_dir is not None else ConsoleSink()


class _Steps:
    """Progress of one long step, see ``steps``."""

    def __init__(self, total: int, desc: str, unit: str, bar: Any, stream: TextIO, every_s: float) -> None:
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self._bar, self._stream, self._every = bar, stream, every_s
        self._t0 = self._last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self._stream is not None and (now - self._last >= self._every or self.done >= self.total):
            self._last = now
            rate = self.done / max(now - self._t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(
                f"fedrun: {self.desc}: {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s, "
                f"ETA {format_duration(eta)})",
                file=self._stream,
                flush=True,
            )


@contextmanager
def steps(
    total: int, desc: str, unit: str = "img", enabled: bool = True, stream: TextIO | None = None, every_s: float = 30.0
) -> Iterator[_Steps]:
    """Report a long step of ``total`` units: a tqdm bar on a terminal, else a progress line at most every
    ``every_s`` seconds and at the end (a log file shows it is alive). ``enabled=False``: silent."""
    stream = stream or sys.stderr
    bar = None
    if enabled and total > 0 and stream.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit=unit, file=stream, leave=False)
    progress = _Steps(total, desc, unit, bar, stream if enabled else None, every_s)
    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()
