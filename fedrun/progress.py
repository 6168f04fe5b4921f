"""Progress on rank 0: a tqdm bar on a terminal, else one log line per round (loss, img/s, sync, ETA)."""

from __future__ import annotations

import sys
import time


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, total_rounds: int, start_round: int, enabled: bool, steps_per_round: int,
                 stream=None) -> None:
        self.total = total_rounds
        self.start = start_round
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.bar = None
        self.steps_per_round = steps_per_round
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=(total_rounds - start_round) * steps_per_round, unit="step",
                            file=self.stream, dynamic_ncols=True,
                            desc=f"round {start_round + 1}/{total_rounds}")

    def advance_steps(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def end_round(self, rnd: int, loss: float, images_per_s: float, sync_s: float) -> None:
        if not self.enabled:
            return
        done = rnd - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - rnd)
        if self.bar is not None:
            self.bar.set_description(f"round {min(rnd + 1, self.total)}/{self.total}")
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}", sync=f"{sync_s:.3f}s")
        else:
            print(f"round {rnd}/{self.total} | loss {loss:.4f} | {images_per_s:.1f} img/s | "
                  f"sync {sync_s:.3f}s | elapsed {_fmt_eta(elapsed)} | ETA {_fmt_eta(eta)}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
