"""evaluation.sample: shapes, range, seeding, samplers, files, run model files, ranks (gloo)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from multiproc import spawn_ranks
from PIL import Image
from torch import nn

from evaluation import sample as S
from evaluation.errors import EvalError
from evaluation.graphs import GraphedForward, GraphsUnavailableError
from fedrun.methods import get_method
from fedrun.rundir import RunDir
from unet import GaussianDiffusion


class CountingNet(nn.Module):
    """A tiny eps-predictor (a 3x3 conv plus a t-dependent bias) that counts its forward calls."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        with torch.random.fork_rng():  # the same weights in every process, global RNG untouched
            torch.manual_seed(0)
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.calls = 0
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.modes.append(self.training)
        return 0.5 * self.conv(x) + 1e-3 * t.float().view(-1, 1, 1, 1)


def _diffusion(T: int = 20) -> GaussianDiffusion:
    return GaussianDiffusion(timesteps=T, beta_start=1e-4, beta_end=0.02, loss="l2")


def test_shapes_range_and_uneven_last_batch():
    net = CountingNet()
    x = S.sample_images(net, _diffusion(), 5, (1, 12, 12), sampler="ddim", steps=4, batch_size=2)
    assert x.shape == (5, 1, 12, 12) and x.dtype == torch.uint8 and x.device.type == "cpu"
    assert x.min() >= 0 and x.max() <= 255 and x.float().std() > 0
    assert net.calls == 3 * 4  # 3 batches (2, 2, 1) x 4 DDIM steps


def test_cuda_graphs_on_a_cpu_are_one_line_before_any_step():
    net = CountingNet()
    with pytest.raises(EvalError, match=r"invalid device=cpu for CUDA graphs: allowed: a CUDA device") as e:
        S.sample_images(net, _diffusion(), 2, (1, 8, 8), sampler="ddim", steps=2, batch_size=2, graphs=True)
    assert "\n" not in str(e.value) and net.calls == 0
    with pytest.raises(GraphsUnavailableError, match="device=cpu"):
        GraphedForward(net)(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    assert net.calls == 0


def test_ddpm_runs_all_T_steps_and_ddim_the_chosen_number():
    net = CountingNet()
    S.sample_images(net, _diffusion(T=20), 2, (1, 8, 8), sampler="ddpm", batch_size=2)
    assert net.calls == 20
    net.calls = 0
    S.sample_images(net, _diffusion(T=20), 2, (1, 8, 8), sampler="ddim", steps=7, batch_size=2)
    assert net.calls == 7
    assert S.sampler_steps("ddim", None) == S.DEFAULT_DDIM_STEPS
    assert S.sampler_steps("ddpm", None) is None
    with pytest.raises(EvalError, match="ddim"):
        S.sampler_steps("ddpm", 10)
    with pytest.raises(EvalError, match="sampler"):
        S.sampler_steps("euler", None)


def test_ddpm_clip_sampler_clips_x0_each_step():
    class Bright(nn.Module):  # eps pushing x0 far above 1: the clipped chain stays inside, the plain one not
        def forward(self, x, t):
            return torch.where(t.view(-1, 1, 1, 1) > 0, -50.0, 0.0).expand_as(x)

    d = _diffusion(T=20)
    clip = S.sample_images(Bright(), d, 4, (1, 4, 4), sampler="ddpm-clip", batch_size=4, seed=3)
    plain = S.sample_images(Bright(), d, 4, (1, 4, 4), sampler="ddpm", batch_size=4, seed=3)
    g = torch.Generator().manual_seed(S.batch_seed(3, 0))
    direct = d.sample(Bright(), (4, 1, 4, 4), "cpu", generator=g, clip_x0=True)
    assert torch.equal(clip, S.to_uint8(direct))
    assert plain.eq(255).all() and clip.lt(255).any()
    assert S.sampler_steps("ddpm-clip", None) is None
    with pytest.raises(EvalError, match="ddpm-clip always runs all T steps"):
        S.sampler_steps("ddpm-clip", 5)


def test_model_mode_is_eval_while_sampling_and_restored_after():
    net = CountingNet().train()
    S.sample_images(net, _diffusion(), 2, (1, 8, 8), sampler="ddim", steps=3, batch_size=2)
    assert net.modes and not any(net.modes)
    assert net.training


def test_seeded_sampling_is_deterministic_and_per_batch():
    net, d = CountingNet(), _diffusion()
    kw = dict(sampler="ddim", steps=3, batch_size=2)
    a = S.sample_images(net, d, 6, (1, 8, 8), seed=11, **kw)
    b = S.sample_images(net, d, 6, (1, 8, 8), seed=11, **kw)
    c = S.sample_images(net, d, 6, (1, 8, 8), seed=12, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Batch i's noise depends on (seed, i) only: asking for fewer images gives a prefix of the same set.
    assert torch.equal(S.sample_images(net, d, 3, (1, 8, 8), seed=11, **kw), a[:3])
    # ... and batches differ from each other.
    assert not torch.equal(a[0:2], a[2:4])


def test_with_the_real_tiny_unet():
    from fedrun.build import build_diffusion, build_model, image_shape
    from fedrun.presets import get_preset

    cfg = get_preset("tiny")
    c, s = image_shape(cfg)
    x = S.sample_images(
        build_model(cfg), build_diffusion(cfg), 3, (c, s, s), sampler="ddim", steps=2, batch_size=2, seed=0
    )
    assert (c, s) == (1, 16) and x.shape == (3, 1, 16, 16) and x.dtype == torch.uint8


def test_to_uint8_maps_the_model_range():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0])
    assert S.to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255]  # 127.5 -> 128 and 191.25 -> 191, rounded


def test_npz_and_grid_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8, generator=g)
    npz = S.save_npz(x, tmp_path / "e" / "s.npz")
    with np.load(npz) as f:
        assert f.files == ["x"]
        np.testing.assert_array_equal(f["x"], x.numpy())
    png = S.save_grid(x, tmp_path / "e" / "g.png")
    with Image.open(png) as im:
        # ceil(sqrt(5)) = 3 columns, 2 rows, 2-px padding: 3*28 + 4*2 = 92 wide, 2*28 + 3*2 = 62 high.
        assert im.size == (92, 62)
        # The first tile is the first image (grey saved as RGB by torchvision).
        tile = np.asarray(im.convert("L"))[2:30, 2:30]
    np.testing.assert_array_equal(tile, x[0, 0].numpy())
    with pytest.raises(EvalError):
        S.save_npz(x.float(), tmp_path / "bad.npz")


def test_run_model_files(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "global.pt").write_bytes(b"")
    assert S.run_model_files(RunDir(tmp_path), get_method("full"), 2) == {"raw": [("global", models / "global.pt")]}
    with pytest.raises(EvalError, match="without EMA"):
        S.run_model_files(RunDir(tmp_path), get_method("usplit"), 2, "ema")
    (models / "global_ema.pt").write_bytes(b"")
    # default: both when EMA exists
    assert list(S.run_model_files(RunDir(tmp_path), get_method("full"), 2)) == ["raw", "ema"]
    assert list(S.run_model_files(RunDir(tmp_path), get_method("full"), 2, "ema")) == ["ema"]
    with pytest.raises(EvalError, match="client1.pt"):
        (models / "client0.pt").write_bytes(b"")
        S.run_model_files(RunDir(tmp_path), get_method("udec"), 2)
    (models / "client1.pt").write_bytes(b"")
    files = S.run_model_files(RunDir(tmp_path), get_method("ulatdec"), 2)
    assert files == {"raw": [("client0", models / "client0.pt"), ("client1", models / "client1.pt")]}
    with pytest.raises(EvalError, match="weights"):
        S.run_model_files(RunDir(tmp_path), get_method("full"), 2, "best")


def test_load_weights_checks_the_keys(tmp_path):
    net = CountingNet()
    torch.save({k: v + 1 for k, v in net.state_dict().items()}, tmp_path / "ok.pt")
    other = S.load_weights(CountingNet(), tmp_path / "ok.pt")
    assert torch.equal(other.conv.bias, net.conv.bias + 1)
    torch.save({"conv.weight": net.conv.weight.detach()}, tmp_path / "partial.pt")
    with pytest.raises(EvalError, match="conv.bias"):
        S.load_weights(CountingNet(), tmp_path / "partial.pt")


# -- several ranks (gloo): each samples its batches, all_gather puts them back in order ----------------


def _sample_body(ctx: object) -> dict:
    net = CountingNet()
    x = S.sample_images(net, _diffusion(), 7, (1, 8, 8), sampler="ddim", steps=3, batch_size=2, seed=5)
    return {"x": x.tolist(), "calls": net.calls}


@pytest.mark.multiproc
def test_two_ranks_give_the_single_process_samples(tmp_path):
    world = 2
    results = spawn_ranks(world, _sample_body, tmp_path, timeout_s=120, init_timeout_s=60)
    single = S.sample_images(CountingNet(), _diffusion(), 7, (1, 8, 8), sampler="ddim", steps=3, batch_size=2, seed=5)
    for res in results:
        assert torch.equal(torch.tensor(res["x"], dtype=torch.uint8), single)
    # 4 batches of 2 (the last has 1): rank 0 samples batches 0 and 2, rank 1 batches 1 and 3.
    assert [res["calls"] for res in results] == [2 * 3, 2 * 3]


def test_channels_last_for_sampling_changes_the_samples_only_by_rounding():
    from fedrun.build import build_model
    from fedrun.presets import get_preset

    cfg, d = get_preset("tiny"), _diffusion(T=10)
    plain = build_model(cfg)
    cl = build_model(cfg)
    cl.load_state_dict(plain.state_dict())  # the same weights
    assert S.for_sampling(cl) is cl
    assert cl.downs[0].downsample.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.downs[0].downsample.weight.is_contiguous(memory_format=torch.channels_last)
    a = S.sample_images(plain, d, 2, (1, 28, 28), batch_size=2, seed=5, progress=False)
    b = S.sample_images(cl, d, 2, (1, 28, 28), batch_size=2, seed=5, progress=False)
    assert (a.int() - b.int()).abs().max() <= 1  # uint8 levels: the same chain, sums in another order
    assert a.float().std() > 0
