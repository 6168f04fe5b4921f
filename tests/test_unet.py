"""Architectures, parameter groups and EMA: counts from docs/feddiffuse.md, shapes, pinned names."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from unet import ARCHS, EMA, GROUPS, DDPMUNet, UNet, create_model, group_sizes, parameter_groups
from unet.ddpm_unet import Downsample, SelfAttention, timestep_embedding
from unet.model import Attention, SinusoidalEmbedding


@pytest.fixture(scope="module")
def paper28() -> UNet:
    torch.manual_seed(0)
    return UNet(dim=28, channels=1).eval()


@pytest.fixture(scope="module")
def ddpm32() -> DDPMUNet:
    torch.manual_seed(0)
    return DDPMUNet().eval()


def _n(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- paper UNet


def test_paper_unet_fmnist_counts(paper28: UNet) -> None:
    # docs/feddiffuse.md section 1, table for Fashion-MNIST (dim 28, 1 channel).
    assert group_sizes(paper28) == {
        "encoder": 1_280_642,
        "bottleneck": 999_376,
        "decoder": 716_297,
        "total": 2_996_315,
    }


def test_paper_unet_celeba_count() -> None:
    # Counting only (no forward pass): dim 64, 3 channels.
    assert _n(UNet(dim=64, channels=3)) == 14_892_477


def test_paper_unet_bottleneck_count_by_hand() -> None:
    # Bottleneck on c = 112 channels, time_dim 112: two ConvNeXt(c, c, t) and a pre-norm full attention.
    c, tdim = 112, 112
    conv = lambda i, o, k: i * o * k * k + o
    convnext = (tdim * c + c) + (c * 49 + c) + 2 * c + conv(c, 2 * c, 3) + 2 * 2 * c + conv(2 * c, c, 3)
    attn = 2 * c + c * 384 + conv(128, c, 1)  # pre-norm, qkv (no bias), out conv
    assert group_sizes(UNet(28, 1))["bottleneck"] == 2 * convnext + attn == 999_376


def test_paper_unet_shapes_and_resolutions(paper28: UNet) -> None:
    x = torch.randn(2, 1, 28, 28)
    seen = []
    hooks = [lvl.register_forward_hook(lambda m, i, o: seen.append(o[1].shape)) for lvl in paper28.downs]
    with torch.no_grad():
        y = paper28(x, torch.tensor([0, 999]))
    for h in hooks:
        h.remove()
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    # 28 -> 14 -> 7, no downsample after the last level; channels 28 / 56 / 112.
    assert seen == [(2, 28, 14, 14), (2, 56, 7, 7), (2, 112, 7, 7)]


def test_paper_unet_32x32x3_forward() -> None:
    torch.manual_seed(0)
    model = UNet(dim=32, channels=3).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert model(x, torch.tensor([5])).shape == (1, 3, 32, 32)


def test_tiny_paper_unet_uses_time() -> None:
    torch.manual_seed(0)
    model = UNet(dim=8, channels=2, dim_mults=(1, 2)).eval()
    x = torch.randn(1, 2, 8, 8).expand(2, -1, -1, -1)
    with torch.no_grad():
        y = model(x, torch.tensor([0, 500]))
    assert y.shape == (2, 2, 8, 8)
    assert not torch.allclose(y[0], y[1])  # same image, different t: the time embedding is wired in


def test_paper_sinusoidal_embedding_values() -> None:
    emb = SinusoidalEmbedding(8)(torch.tensor([0, 1, 2]))
    # half = 4 frequencies 10000^(-i/3): 1, 0.0464159, 0.00215443, 0.0001
    freqs = [10000 ** (-i / 3) for i in range(4)]
    expected = [[math.sin(t * f) for f in freqs] + [math.cos(t * f) for f in freqs] for t in (0, 1, 2)]
    torch.testing.assert_close(emb, torch.tensor(expected))
    assert SinusoidalEmbedding(7)(torch.tensor([3])).shape == (1, 7)  # odd dims are padded


def test_paper_full_attention_matches_reference() -> None:
    # The reference code's einsum attention: heads split as "b (h c) x y -> b h c (x y)", scale 32^-1/2.
    torch.manual_seed(0)
    attn = Attention(16)
    x = torch.randn(2, 16, 3, 5)
    q, k, v = (z.reshape(2, 4, 32, 15) for z in attn.to_qkv(x).chunk(3, dim=1))
    sim = torch.einsum("bhdi,bhdj->bhij", q * 32**-0.5, k).softmax(dim=-1)
    out = torch.einsum("bhij,bhdj->bhid", sim, v).permute(0, 1, 3, 2).reshape(2, 128, 3, 5)
    torch.testing.assert_close(attn(x), attn.to_out(out))


# ---------------------------------------------------------------- DDPM UNet


def _ddpm_counts_by_hand() -> dict[str, int]:
    # diffusers' UNet2DModel for google/ddpm-cifar10-32, block by block.
    conv = lambda i, o, k: i * o * k * k + o
    lin = lambda i, o: i * o + o
    gn = lambda c: 2 * c
    shortcut = lambda i, o: conv(i, o, 1) if i != o else 0
    res = lambda i, o: gn(i) + conv(i, o, 3) + lin(512, o) + gn(o) + conv(o, o, 3) + shortcut(i, o)
    attn = lambda c: gn(c) + 4 * lin(c, c)
    down = lambda c: conv(c, c, 3)
    up = lambda c: conv(c, c, 3)
    encoder = (
        lin(128, 512) + lin(512, 512) + conv(3, 128, 3)
        + 2 * res(128, 128) + down(128)
        + res(128, 256) + res(256, 256) + 2 * attn(256) + down(256)
        + 2 * res(256, 256) + down(256)
        + 2 * res(256, 256)
    )  # fmt: skip
    bottleneck = 2 * res(256, 256) + attn(256)
    decoder = (
        3 * res(512, 256) + up(256)
        + 3 * res(512, 256) + up(256)
        + 2 * res(512, 256) + res(384, 256) + 3 * attn(256) + up(256)
        + res(384, 128) + 2 * res(256, 128)
        + gn(128) + conv(128, 3, 3)
    )  # fmt: skip
    return {"encoder": encoder, "bottleneck": bottleneck, "decoder": decoder}


def test_ddpm_unet_counts(ddpm32: DDPMUNet) -> None:
    sizes = group_sizes(ddpm32)
    assert sizes["total"] == 35_746_307  # google/ddpm-cifar10-32
    assert sizes == {**_ddpm_counts_by_hand(), "total": 35_746_307}
    assert (sizes["encoder"], sizes["bottleneck"], sizes["decoder"]) == (10_523_008, 2_888_704, 22_334_595)


def test_ddpm_unet_forward_32x32x3(ddpm32: DDPMUNet) -> None:
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = ddpm32(x, torch.tensor([999]))
    assert y.shape == (1, 3, 32, 32)
    assert torch.isfinite(y).all()


def test_ddpm_unet_attention_placement(ddpm32: DDPMUNet) -> None:
    # Attention only at 16x16: the second encoder level and the third decoder level (plus the mid block).
    assert [b.attentions is not None for b in ddpm32.down_blocks] == [False, True, False, False]
    assert [b.attentions is not None for b in ddpm32.up_blocks] == [False, False, True, False]
    assert [len(b.resnets) for b in ddpm32.up_blocks] == [3, 3, 3, 3]


def test_ddpm_timestep_embedding_values() -> None:
    # flip_sin_to_cos=False, freq_shift=1: w_i = 10000^(-i / 63) for dim 128.
    emb = timestep_embedding(torch.tensor([0, 1, 7]), 128)
    assert emb.shape == (3, 128)
    for row, t in enumerate((0, 1, 7)):
        for i in (0, 1, 63):
            w = 10000 ** (-i / 63)
            assert emb[row, i].item() == pytest.approx(math.sin(t * w), abs=1e-6)
            assert emb[row, 64 + i].item() == pytest.approx(math.cos(t * w), abs=1e-6)


def test_ddpm_downsample_pads_right_and_bottom_only() -> None:
    # diffusers' Downsample2D with padding=0 pads (0, 1, 0, 1) then convolves 3x3 stride 2: a kernel that
    # picks its centre tap returns x[2i+1, 2j+1] (symmetric padding 1 would give x[2i, 2j]).
    down = Downsample(1)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 1, 1] = 1.0
        down.conv.bias.zero_()
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    torch.testing.assert_close(down(x), x[:, :, 1::2, 1::2])


def test_ddpm_self_attention_matches_reference() -> None:
    torch.manual_seed(0)
    attn = SelfAttention(32)
    x = torch.randn(2, 32, 4, 4)
    z = attn.group_norm(x).flatten(2).transpose(1, 2)  # [B, N, c]
    w = (attn.to_q(z) @ attn.to_k(z).transpose(1, 2) / math.sqrt(32)).softmax(dim=-1)
    ref = x + attn.to_out(w @ attn.to_v(z)).transpose(1, 2).reshape(2, 32, 4, 4)
    torch.testing.assert_close(attn(x), ref)


def test_small_ddpm_unet_dropout_and_time() -> None:
    torch.manual_seed(0)
    model = DDPMUNet(16, base_channels=32, channel_mults=(1, 2), attn_resolutions=(8,), dropout=0.5)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 3])
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x, t), model(x, t))
        assert not torch.allclose(model(x, t), model(x, torch.tensor([3, 900])))
        model.train()
        assert not torch.allclose(model(x, t), model(x, t))  # dropout is active in training


def test_ddpm_unet_rejects_indivisible_size() -> None:
    with pytest.raises(ValueError, match="divisible"):
        DDPMUNet(image_size=28)


# ---------------------------------------------------------------- groups


def test_group_prefixes_pinned() -> None:
    # These names are a public API: checkpoints and the federated methods depend on them.
    assert GROUPS == ("encoder", "bottleneck", "decoder")
    assert UNet.GROUP_PREFIXES == {
        "encoder": ("init_conv", "time_mlp", "downs"),
        "bottleneck": ("mid_block1", "mid_attn", "mid_block2"),
        "decoder": ("ups", "final_block", "final_conv"),
    }
    assert DDPMUNet.GROUP_PREFIXES == {
        "encoder": ("time_embedding", "conv_in", "down_blocks"),
        "bottleneck": ("mid_block",),
        "decoder": ("up_blocks", "conv_norm_out", "conv_out"),
    }


@pytest.mark.parametrize("which", ["paper28", "ddpm32"])
def test_every_parameter_in_exactly_one_group(which: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(which)
    groups = parameter_groups(model)
    assert tuple(groups) == GROUPS
    names = [n for n, _ in model.named_parameters()]
    flat = [n for g in GROUPS for n in groups[g]]
    assert sorted(flat) == sorted(names) and len(set(flat)) == len(names)
    for g in GROUPS:  # named_parameters() order within each group, and each top-level child lies in its group
        assert groups[g] == [n for n in names if n in set(groups[g])]
        assert {n.split(".")[0] for n in groups[g]} == set(type(model).GROUP_PREFIXES[g])


class _Toy(nn.Module):
    GROUP_PREFIXES = {"encoder": ("ups",), "bottleneck": ("mid",), "decoder": ("upsample",)}

    def __init__(self) -> None:
        super().__init__()
        self.ups = nn.Linear(2, 2)
        self.mid = nn.Linear(2, 1, bias=False)
        self.upsample = nn.Linear(1, 3)


def test_groups_match_whole_name_components() -> None:
    # Prefix "ups" must not claim "upsample.*".
    toy = _Toy()
    assert parameter_groups(toy) == {
        "encoder": ["ups.weight", "ups.bias"],
        "bottleneck": ["mid.weight"],
        "decoder": ["upsample.weight", "upsample.bias"],
    }
    assert group_sizes(toy) == {"encoder": 6, "bottleneck": 2, "decoder": 6, "total": 14}


def test_groups_reject_uncovered_and_overlapping() -> None:
    class Uncovered(_Toy):
        GROUP_PREFIXES = {"encoder": ("ups",), "bottleneck": ("mid",), "decoder": ()}

    class Overlap(_Toy):
        GROUP_PREFIXES = {"encoder": ("ups", "mid"), "bottleneck": ("mid",), "decoder": ("upsample",)}

    class WrongGroups(_Toy):
        GROUP_PREFIXES = {"encoder": ("ups",), "latent": ("mid",), "decoder": ("upsample",)}

    with pytest.raises(ValueError, match="'upsample.weight'.*no group"):
        parameter_groups(Uncovered())
    with pytest.raises(ValueError, match="'mid.weight'.*several groups"):
        parameter_groups(Overlap())
    with pytest.raises(ValueError, match="GROUP_PREFIXES"):
        parameter_groups(WrongGroups())
    with pytest.raises(ValueError, match="declares no GROUP_PREFIXES"):
        parameter_groups(nn.Linear(2, 2))


# ---------------------------------------------------------------- create_model


def test_create_model() -> None:
    paper = create_model("paper-unet", image_size=28, channels=1)
    assert isinstance(paper, UNet) and paper.dim == 28 and _n(paper) == 2_996_315
    tiny = create_model("paper-unet", image_size=8, channels=3, dim_mults=(1, 2))
    assert isinstance(tiny, UNet) and tiny.dim_mults == (1, 2) and tiny.channels == 3
    ddpm = create_model("ddpm-unet", image_size=16, channels=1, dim_mults=(1, 2), dropout=0.0)
    assert isinstance(ddpm, DDPMUNet) and ddpm.conv_in.in_channels == 1 and len(ddpm.down_blocks) == 2
    assert ddpm.mid_block.resnet1.dropout.p == 0.0
    assert ARCHS == ("paper-unet", "ddpm-unet")
    with pytest.raises(ValueError, match=r"'unet3d'.*paper-unet.*ddpm-unet"):
        create_model("unet3d", image_size=28, channels=1)


# ---------------------------------------------------------------- EMA


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1)
        self.register_buffer("scale", torch.tensor([2.0]))
        self.register_buffer("count", torch.tensor([5]))

    def set(self, w: float, b: float, s: float) -> None:
        with torch.no_grad():
            self.lin.weight.fill_(w)
            self.lin.bias.fill_(b)
            self.scale.fill_(s)


def test_ema_update_by_hand() -> None:
    net = _Net()
    net.set(1.0, 0.0, 2.0)
    ema = EMA(net, decay=0.75)
    assert set(ema.shadow) == {"lin.weight", "lin.bias", "scale"}  # integer buffers are not tracked
    net.set(5.0, -4.0, 6.0)
    ema.update(net)  # 0.75 * 1 + 0.25 * 5 = 2;  0.75 * 0 + 0.25 * -4 = -1;  0.75 * 2 + 0.25 * 6 = 3
    assert [ema.shadow[k].item() for k in ("lin.weight", "lin.bias", "scale")] == [2.0, -1.0, 3.0]
    net.set(6.0, 3.0, 3.0)
    ema.update(net)  # 0.75 * 2 + 0.25 * 6 = 3;  0.75 * -1 + 0.25 * 3 = 0;  0.75 * 3 + 0.25 * 3 = 3
    assert [ema.shadow[k].item() for k in ("lin.weight", "lin.bias", "scale")] == [3.0, 0.0, 3.0]
    assert ema.num_updates == 2
    # The model itself is untouched by update; copy_to writes the shadow into it.
    assert net.lin.weight.item() == 6.0
    ema.copy_to(net)
    assert (net.lin.weight.item(), net.lin.bias.item(), net.scale.item()) == (3.0, 0.0, 3.0)
    assert net.count.item() == 5  # integer buffers are left alone


def test_ema_fp32_shadow_and_state_dict_roundtrip() -> None:
    net = _Net().half()
    net.set(1.0, 1.0, 1.0)
    ema = EMA(net, decay=0.5)
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    net.set(2.0, 2.0, 2.0)
    ema.update(net)
    sd = ema.state_dict()
    other = EMA(_Net(), decay=0.9)
    other.load_state_dict(sd)
    assert other.decay == 0.5 and other.num_updates == 1
    assert all(other.shadow[k].item() == 1.5 for k in other.shadow)
    sd["shadow"]["lin.weight"].fill_(9.0)  # state_dict() holds copies, not the live shadow
    assert ema.shadow["lin.weight"].item() == 1.5


def test_ema_rejects_mismatched_model_and_bad_decay() -> None:
    ema = EMA(_Net(), decay=0.9)
    with pytest.raises(ValueError, match="does not match"):
        ema.update(nn.Linear(1, 1))
    with pytest.raises(ValueError, match="decay"):
        EMA(_Net(), decay=1.5)
