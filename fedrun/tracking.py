"""Metrics sinks: TensorBoard on rank 0, a do-nothing sink everywhere else (and in tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class Tracker(Protocol):
    def scalar(self, tag: str, value: float, step: int) -> None: ...
    def image(self, tag: str, img_chw: np.ndarray, step: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class NullTracker:
    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def image(self, tag: str, img_chw: np.ndarray, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Real event files under ``log_dir``. ``purge_step`` drops events a resumed run will redo."""

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._w = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._w.add_scalar(tag, value, step)

    def image(self, tag: str, img_chw: np.ndarray, step: int) -> None:
        self._w.add_image(tag, img_chw, step, dataformats="CHW")

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()
