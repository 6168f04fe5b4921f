"""What an evaluation may be asked, and the protocol it records: samplers, weight kinds, stages, references.

Torch-free on purpose: ``fedrun``'s argument parser takes its choice lists from here, and ``fedrun --help``
must not import torch. The modules that give these names meaning (``evaluation.sample``, ``.inception``,
``.sources``, ``.evaluate``) import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedrun.config import DATASETS

SAMPLERS = ("ddpm", "ddpm-clip", "ddim", "ddim-clip")
"""ddpm: ancestral over all T steps (the paper's); ddpm-clip: the same, x0 clipped to [-1, 1] each step (Ho et
al.'s code); ddim: ``steps`` deterministic steps; ddim-clip: the same, x0 clipped each step (GLIDE)."""
DEFAULT_SAMPLER = "ddpm"
DEFAULT_DDIM_STEPS = 50
WEIGHT_KINDS = ("raw", "ema")
"""The weights of a run's final models: as trained, and their EMA."""
WEIGHT_CHOICES = (*WEIGHT_KINDS, "both")
STAGES = ("all", "sample", "score")
"""all: sample and score; sample: only sample (no Inception needed); score: score the saved samples."""
DEFAULT_NUM_SAMPLES = 1000
"""The paper's samples per model."""
DEFAULT_SEED = 0
SAMPLES_JSON = "samples.json"
"""What ``stage='sample'`` leaves in the run's eval/ for ``stage='score'``."""
DATASET_SPLITS = ("train", "test")

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
"""The file pytorch-fid downloads on first use (its FID Inception weights)."""
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME

FID_FLOOR_NOTE = (
    "FID is biased upwards at small sample counts: 1,000 real Fashion-MNIST training images score "
    "about 15.5 against the 10,000 test images, so numbers are comparable only under the same protocol"
)


def known_datasets() -> tuple[str, ...]:
    """Datasets with named splits, usable as a reference ``DATASET:SPLIT`` (an image folder is a folder)."""
    return tuple(d for d in DATASETS if d != "imagefolder")


@dataclass(frozen=True)
class Protocol:
    """How the samples are drawn: the part of fid.json's ``protocol`` that sampling decides."""

    num_samples: int
    sampler: str
    ddim_steps: int | None
    """DDIM steps, or None for ancestral sampling over all T steps."""
    seed: int
    batch_size: int

    def record(self, timesteps: int, weights: list[str]) -> dict[str, Any]:
        """As fid.json and samples.json hold it; ``steps`` is T for the ancestral samplers."""
        return {
            "num_samples": self.num_samples,
            "sampler": self.sampler,
            "weights": weights,
            "steps": self.ddim_steps if self.ddim_steps is not None else timesteps,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }
