"""ProGAN G and D: shapes, fade-in, growth, equalized LR, pixelnorm, minibatch-stddev."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from workers.networks import (
    Discriminator,
    EqualizedConv2d,
    EqualizedLinear,
    Generator,
    channels_at,
    fade_images,
    minibatch_stddev,
    pixel_norm,
)

SMALL = dict(fmap_base=64, fmap_max=16)
LATENT = 8


def test_channels_at_matches_paper_table():
    want = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
    assert {r: channels_at(r, 8192, 512) for r in want} == want
    assert channels_at(2, 8192, 512) == 512 and channels_at(2, 64, 512) == 64


@pytest.mark.parametrize("channels", [1, 3])
@torch.no_grad()
def test_shapes_at_every_resolution(channels):
    torch.manual_seed(0)
    G = Generator(4, channels, LATENT, **SMALL)
    D = Discriminator(4, channels, **SMALL)
    z = torch.randn(2, LATENT)
    while True:
        r = G.resolution
        assert D.resolution == r
        for alpha in (0.0, 0.5, 1.0):
            x = G(z, alpha)
            assert x.shape == (2, channels, r, r)
            assert D(x, alpha).shape == (2, 1)
            assert torch.isfinite(x).all()
        if r == 1024:
            break
        G.grow()
        D.grow()


@pytest.mark.parametrize("res", [8, 16, 32])
def test_alpha_zero_equals_previous_resolution(res):
    torch.manual_seed(1)
    G_prev = Generator(res // 2, 3, LATENT, **SMALL)
    D_prev = Discriminator(res // 2, 3, **SMALL)
    G, D = copy.deepcopy(G_prev), copy.deepcopy(D_prev)
    G.grow()
    D.grow()
    z = torch.randn(4, LATENT)
    x = torch.randn(4, 3, res, res)
    torch.testing.assert_close(G(z, 0.0), F.interpolate(G_prev(z), scale_factor=2, mode="nearest"))
    torch.testing.assert_close(D(x, 0.0), D_prev(F.avg_pool2d(x, 2)))
    # Mid-fade the new path really contributes.
    assert not torch.allclose(G(z, 0.5), G(z, 0.0))
    assert not torch.allclose(D(x, 0.5), D(x, 0.0))


def test_alpha_zero_matches_net_built_at_previous_resolution_from_same_weights():
    torch.manual_seed(2)
    G, D = Generator(16, 1, LATENT, **SMALL), Discriminator(16, 1, **SMALL)
    G_prev, D_prev = Generator(8, 1, LATENT, **SMALL), Discriminator(8, 1, **SMALL)
    G_prev.load_state_dict({k: v for k, v in G.state_dict().items() if k in G_prev.state_dict()})
    D_prev.load_state_dict({k: v for k, v in D.state_dict().items() if k in D_prev.state_dict()})
    z, x = torch.randn(2, LATENT), torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(G(z, 0.0), F.interpolate(G_prev(z), scale_factor=2, mode="nearest"))
    torch.testing.assert_close(D(x, 0.0), D_prev(F.avg_pool2d(x, 2)))


@pytest.mark.parametrize("net", ["G", "D"])
def test_grow_keeps_every_old_weight(net):
    torch.manual_seed(3)
    model = Generator(8, 3, LATENT, **SMALL) if net == "G" else Discriminator(8, 3, **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.grow()
    after = model.state_dict()
    assert set(before) < set(after)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert any(k.startswith(("blocks.16.", "to_rgb.16.", "from_rgb.16.")) for k in after)


@pytest.mark.parametrize("res", [4, 8, 64])
def test_state_dict_keys_built_vs_grown(res):
    for make in (lambda r: Generator(r, 3, LATENT, **SMALL), lambda r: Discriminator(r, 3, **SMALL)):
        torch.manual_seed(4)
        built = make(res)
        torch.manual_seed(4)
        grown = make(4)
        while grown.resolution < res:
            grown.grow()
        assert list(built.state_dict()) == list(grown.state_dict())
        # Construction is repeated growth, so the same seed gives the same weights.
        for k, v in built.state_dict().items():
            assert torch.equal(v, grown.state_dict()[k]), k
        grown.load_state_dict(built.state_dict(), strict=True)


def test_load_then_grow_matches_direct_growth():
    """The loop's resume path: build at the checkpoint's resolution, load, grow."""
    torch.manual_seed(5)
    G = Generator(8, 1, LATENT, **SMALL)
    G2 = Generator(8, 1, LATENT, **SMALL)
    G2.load_state_dict(G.state_dict())
    G.grow()
    G2.grow()
    old = [k for k in G.state_dict() if not k.startswith(("blocks.16.", "to_rgb.16."))]
    for k in old:
        assert torch.equal(G.state_dict()[k], G2.state_dict()[k])


def test_stable_phase_does_not_evaluate_old_rgb_layers():
    G, D = Generator(16, 3, LATENT, **SMALL), Discriminator(16, 3, **SMALL)
    calls = {"G": 0, "D": 0}
    G.to_rgb["8"].register_forward_hook(lambda *_: calls.__setitem__("G", calls["G"] + 1))
    D.from_rgb["8"].register_forward_hook(lambda *_: calls.__setitem__("D", calls["D"] + 1))
    D(G(torch.randn(2, LATENT), 1.0), 1.0)
    assert calls == {"G": 0, "D": 0}
    D(G(torch.randn(2, LATENT), 0.3), 0.3)
    assert calls == {"G": 1, "D": 1}


def test_grow_follows_device_and_dtype():
    G = Generator(4, 3, LATENT, **SMALL).double()
    D = Discriminator(4, 3, **SMALL).double()
    G.grow()
    D.grow()
    assert all(p.dtype == torch.float64 for p in [*G.parameters(), *D.parameters()])
    assert D(G(torch.randn(2, LATENT, dtype=torch.float64), 0.5), 0.5).dtype == torch.float64


def test_equalized_layers_store_unit_normal_weights_and_scale_at_run_time():
    torch.manual_seed(6)
    conv = EqualizedConv2d(256, 256, 3)
    w = conv.weight.detach()
    assert abs(w.mean().item()) < 0.01 and abs(w.std().item() - 1) < 0.01
    assert torch.count_nonzero(conv.bias) == 0
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 256, 5, 5)
    want = F.conv2d(x, w * math.sqrt(2) / math.sqrt(256 * 9), conv.bias, padding=1)
    torch.testing.assert_close(conv(x), want)

    lin = EqualizedLinear(512, 1024, gain=1.0)
    w = lin.weight.detach()
    assert abs(w.mean().item()) < 0.01 and abs(w.std().item() - 1) < 0.01
    with torch.no_grad():
        lin.bias.normal_()
    x = torch.randn(3, 512)
    torch.testing.assert_close(lin(x), x @ (w / math.sqrt(512)).T + lin.bias)


def test_reference_gains():
    G = Generator(8, 3, 32, fmap_base=8192, fmap_max=16)
    D = Discriminator(8, 3, fmap_base=8192, fmap_max=16)
    assert G.blocks["4"].dense.scale == pytest.approx(math.sqrt(2) / 4 / math.sqrt(32))
    assert G.blocks["8"].conv0.scale == pytest.approx(math.sqrt(2) / math.sqrt(16 * 9))
    assert G.to_rgb["8"].scale == pytest.approx(1 / math.sqrt(16))
    assert D.from_rgb["8"].scale == pytest.approx(math.sqrt(2) / math.sqrt(3))
    assert D.blocks["4"].conv.weight.shape == (16, 17, 3, 3)
    assert D.blocks["4"].dense0.scale == pytest.approx(math.sqrt(2) / math.sqrt(16 * 16))
    assert D.blocks["4"].dense1.scale == pytest.approx(1 / math.sqrt(16))


def test_pixel_norm_gives_unit_mean_square_per_pixel():
    x = torch.randn(3, 16, 5, 5) * torch.rand(3, 1, 5, 5) * 10
    ms = pixel_norm(x).square().mean(dim=1)
    torch.testing.assert_close(ms, torch.ones_like(ms))


def test_minibatch_stddev_zero_for_identical_samples():
    x = torch.randn(1, 5, 4, 4).expand(8, -1, -1, -1)
    y = minibatch_stddev(x, 4)
    assert y.shape == (8, 6, 4, 4)
    assert torch.equal(y[:, :5], x)
    # sqrt(0 + 1e-8) = 1e-4: zero up to the reference's epsilon.
    torch.testing.assert_close(y[:, 5], torch.full((8, 4, 4), 1e-4))


def test_minibatch_stddev_matches_loop_over_strided_groups():
    torch.manual_seed(7)
    x = torch.randn(8, 3, 2, 2)
    y = minibatch_stddev(x, 4)[:, 3]
    m = 8 // 4
    for i in range(8):
        group = x[i % m :: m]  # the reference reshape [G, M, ...] puts sample n in group n % M
        std = (group.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        torch.testing.assert_close(y[i], torch.full((2, 2), std.item()))
    # group larger than the batch shrinks to the batch
    assert minibatch_stddev(x[:2], 4).shape == (2, 4, 2, 2)
    with pytest.raises(ValueError, match="not divisible"):
        minibatch_stddev(torch.randn(6, 3, 2, 2), 4)


def test_fade_images():
    x = torch.randn(2, 3, 8, 8)
    assert fade_images(x, 1.0) is x
    low = fade_images(x, 0.0)
    torch.testing.assert_close(low[:, :, ::2, ::2], F.avg_pool2d(x, 2))
    torch.testing.assert_close(low[:, :, 1::2, 1::2], F.avg_pool2d(x, 2))
    torch.testing.assert_close(fade_images(x, 0.25), 0.75 * low + 0.25 * x)


def test_rejects_bad_resolution():
    with pytest.raises(ValueError, match="power of two"):
        Generator(12, 3, LATENT)
    with pytest.raises(ValueError, match="power of two"):
        Discriminator(2, 3)
