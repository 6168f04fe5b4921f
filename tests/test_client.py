"""fedrun.client: where the images live, and the data order (derived from seeds, the same wherever they live)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedrun.client import ClientState, LocalTrainer, StepConfig, choose_placement, derive_seed
from fedrun.config import ConfigError, apply_overrides
from fedrun.presets import get_preset
from unet import GaussianDiffusion

CUDA = torch.device("cuda", 0)


def test_choose_placement():
    assert choose_placement("auto", 10**12, torch.device("cpu")) == "device"  # a CPU run trains from RAM
    assert choose_placement("host", 10, torch.device("cpu")) == "device"
    assert choose_placement("auto", 500, CUDA, free_bytes=1000) == "device"  # at most half of free memory
    assert choose_placement("auto", 501, CUDA, free_bytes=1000) == "host"
    assert choose_placement("device", 10**12, CUDA, free_bytes=1000) == "device"  # asked for: honoured
    assert choose_placement("host", 1, CUDA, free_bytes=1000) == "host"
    with pytest.raises(ValueError, match="allowed: auto, device, host"):
        choose_placement("gpu", 1, CUDA, free_bytes=1000)


def test_placement_config_is_checked_and_may_change_on_resume():
    with pytest.raises(ConfigError, match="data.placement"):
        apply_overrides(get_preset("tiny"), {"data.placement": "gpu"})
    from fedrun.rundir import RESUMABLE_CHANGES

    assert "data.placement" in RESUMABLE_CHANGES  # where the images live changes no result


def _trainer(batch_size: int) -> LocalTrainer:
    step = StepConfig(
        lr=1e-3,
        batch_size=batch_size,
        local_epochs=1,
        max_local_steps=None,
        keep_opt_state=False,
        amp_dtype=None,
        seed=11,
    )
    return LocalTrainer(nn.Linear(2, 2), GaussianDiffusion(timesteps=10), step, torch.device("cpu"))


def test_data_order_is_one_cpu_seeded_permutation_per_epoch():
    n, b = 10, 4
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    client = ClientState(cid=3, params={}, images=images)
    trainer = _trainer(b)
    seen = []
    for _ in range(6):  # epoch 0: 4 + 4 + 2, epoch 1: 4 + 4 + 2
        seen.append(trainer._batch_indices(client))
    for epoch, batches in ((0, seen[:3]), (1, seen[3:])):
        want = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(11, 1, 3, epoch)))
        assert torch.equal(torch.cat(batches), want)  # the seeded CPU permutation, each example once
    assert not torch.equal(torch.cat(seen[:3]), torch.cat(seen[3:]))
    assert client.perm is not None and client.perm[0] == 1  # drawn once per epoch, then reused


def test_batch_is_scaled_channels_last_on_the_device():
    n = 6
    images = torch.tensor([0, 255, 51, 102, 153, 204], dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    client = ClientState(cid=0, params={}, images=images.contiguous())
    trainer = _trainer(3)
    x = trainer._batch(client)
    assert x.dtype == torch.float32 and x.shape == (3, 3, 2, 2) and x.device.type == "cpu"
    assert x.is_contiguous(memory_format=torch.channels_last)
    idx = client.perm[1][:3]
    torch.testing.assert_close(x, images[idx].float() / 127.5 - 1.0)
    assert x.min() >= -1.0 and x.max() <= 1.0
