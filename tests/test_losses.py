"""Losses against hand computations, a few real optimisation steps, and the EMA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from service.spec import parse_spec
from workers.losses import LogisticR1, WGANGP, make_loss, penalty_grad_scale, update_ema
from workers.networks import Discriminator, Generator, fade_images, upsample

LATENT = 8


class QuadraticD(nn.Module):
    """D(x) = 0.5 * sum(a * x^2): its input gradient is a * x, so penalties have closed forms in a."""

    def __init__(self, shape):
        super().__init__()
        self.a = nn.Parameter(torch.rand(shape, dtype=torch.float64) + 0.5)

    def forward(self, x, alpha, sets=1):
        return 0.5 * (self.a * x.square()).flatten(1).sum(dim=1, keepdim=True)


def test_wgan_gp_matches_hand_computation():
    torch.manual_seed(0)
    reals = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    fakes = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    D = QuadraticD((1, 2, 2))

    torch.manual_seed(123)
    loss, penalty = WGANGP().d_loss(D, reals, fakes, 1.0)
    loss.backward()

    # The only random draw in d_loss is the per-sample mixing factor.
    torch.manual_seed(123)
    eps = torch.rand(4, 1, 1, 1, dtype=torch.float64)
    a = D.a.detach().clone().requires_grad_(True)
    mixed = reals + (fakes - reals) * eps
    score = lambda x: 0.5 * (a * x.square()).sum(dim=(1, 2, 3))  # noqa: E731
    norms = (a * mixed).square().sum(dim=(1, 2, 3)).sqrt()
    gp = (norms - 1).square()
    want = (score(fakes) - score(reals) + 10 * gp + 0.001 * score(reals).square()).mean()
    want.backward()

    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(penalty, gp.mean().detach())
    assert not penalty.requires_grad
    # The penalty's gradient w.r.t. D's weights needs the double backward to be right.
    torch.testing.assert_close(D.a.grad, a.grad)


def test_logistic_r1_matches_hand_computation():
    torch.manual_seed(1)
    reals = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    fakes = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    D = QuadraticD((1, 2, 2))
    loss, penalty = LogisticR1(gamma=10.0).d_loss(D, reals, fakes, 1.0)
    loss.backward()

    a = D.a.detach().clone().requires_grad_(True)
    score = lambda x: 0.5 * (a * x.square()).sum(dim=(1, 2, 3))  # noqa: E731
    r1 = (a * reals).square().sum(dim=(1, 2, 3))
    want = F.softplus(score(fakes)).mean() + F.softplus(-score(reals)).mean() + 5 * r1.mean()
    want.backward()

    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(penalty, r1.mean().detach())
    torch.testing.assert_close(D.a.grad, a.grad)


def test_generator_losses_match_formulas():
    torch.manual_seed(2)
    fakes = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    D = QuadraticD((1, 2, 2))
    scores = D(fakes, 1.0)
    torch.testing.assert_close(WGANGP().g_loss(D, fakes, 1.0), -scores.mean())
    torch.testing.assert_close(LogisticR1().g_loss(D, fakes, 1.0), F.softplus(-scores).mean())


def test_penalty_backprops_through_progan_discriminator_mid_fade():
    """Double backward through every D op (mbstd, avg-pool, lerp, leaky ReLU, equalized convs)."""
    torch.manual_seed(3)
    D = Discriminator(8, 3, fmap_base=64, fmap_max=16)
    reals = fade_images(torch.randn(4, 3, 8, 8), 0.5)
    fakes = torch.randn(4, 3, 8, 8)
    for loss_fn in (WGANGP(), LogisticR1()):
        D.zero_grad()
        loss, penalty = loss_fn.d_loss(D, reals, fakes, 0.5)
        loss.backward()
        assert torch.isfinite(loss) and penalty > 0
        for name, p in D.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert D.from_rgb["4"].weight.grad.abs().sum() > 0  # the fading-out path is trained too


def upscale(x, factor):
    """Nearest upscale by `factor`, as the reference feeds below-final-resolution images to its D."""
    for _ in range(factor.bit_length() - 1):
        x = upsample(x)
    return x


def reference_gradients(D, x_r, alpha, final):
    """D's scores and input gradients computed as the reference does: the r×r images nearest-upscaled to R×R,
    D behind an R/r average pool (its fromRGB path at lod > 0), the gradient taken w.r.t. the R×R input."""
    factor = final // x_r.shape[-1]
    x_R = upscale(x_r.detach(), factor).requires_grad_(True)
    scores = D(F.avg_pool2d(x_R, factor), alpha)
    (grads,) = torch.autograd.grad(scores.sum(), x_R, create_graph=True)
    return scores, grads


@pytest.mark.parametrize("res, final, alpha", [(4, 32, 1.0), (8, 32, 0.5), (16, 64, 0.25), (32, 32, 0.5)])
def test_reference_gp_scale_equals_the_penalty_at_the_final_resolution(res, final, alpha):
    """grad_scale = r/R gives the same penalty, loss and D gradients as differentiating at R×R."""
    torch.manual_seed(6)
    D = Discriminator(res, 3, fmap_base=64, fmap_max=16).double()
    reals = fade_images(torch.randn(8, 3, res, res, dtype=torch.float64), alpha)
    fakes = torch.randn(8, 3, res, res, dtype=torch.float64)

    torch.manual_seed(7)
    loss, penalty = WGANGP(grad_scale=penalty_grad_scale("reference", res, final)).d_loss(D, reals, fakes, alpha)
    D.zero_grad()
    loss.backward()
    got = {n: p.grad.clone() for n, p in D.named_parameters() if p.grad is not None}  # unused fromRGBs: None
    assert len(got) >= 4

    torch.manual_seed(7)
    mix = torch.rand(8, 1, 1, 1, dtype=torch.float64)
    up = lambda x: upscale(x, final // res)  # noqa: E731
    pool = lambda x: F.avg_pool2d(x, final // res)  # noqa: E731
    real, fake = D(pool(up(reals)), alpha).squeeze(1), D(pool(up(fakes)), alpha).squeeze(1)
    _, grads = reference_gradients(D, torch.lerp(reals, fakes, mix), alpha, final)
    gp = (grads.flatten(1).norm(dim=1) - 1).square()
    want = (fake - real + 10 * gp + 0.001 * real.square()).mean()
    D.zero_grad()
    want.backward()

    torch.testing.assert_close(penalty, gp.mean().detach())
    torch.testing.assert_close(loss, want.detach())
    assert got.keys() == {n for n, p in D.named_parameters() if p.grad is not None}
    for name, grad in got.items():
        torch.testing.assert_close(grad, D.get_parameter(name).grad, msg=name)

    if res < final:  # the local penalty is a different one below the final resolution
        torch.manual_seed(7)
        _, local = WGANGP(grad_scale=penalty_grad_scale("local", res, final)).d_loss(D, reals, fakes, alpha)
        assert not torch.allclose(local, penalty)


def test_reference_gp_scale_holds_in_float32():
    """The training dtype: the scaled norm matches the R×R gradient within float32 rounding."""
    torch.manual_seed(8)
    D = Discriminator(8, 3, fmap_base=64, fmap_max=16)
    reals, fakes = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    torch.manual_seed(9)
    _, penalty = WGANGP(grad_scale=8 / 64).d_loss(D, reals, fakes, 0.5)
    torch.manual_seed(9)
    mix = torch.rand(8, 1, 1, 1)
    _, grads = reference_gradients(D, torch.lerp(reals, fakes, mix), 0.5, 64)
    torch.testing.assert_close(penalty, (grads.flatten(1).norm(dim=1) - 1).square().mean().detach())


def test_reference_r1_equals_r1_at_the_final_resolution():
    """R1 is a squared norm: grad_scale² gives the R×R penalty and the same D gradients."""
    torch.manual_seed(10)
    D = Discriminator(8, 3, fmap_base=64, fmap_max=16).double()
    reals = fade_images(torch.randn(8, 3, 8, 8, dtype=torch.float64), 0.5)
    fakes = torch.randn(8, 3, 8, 8, dtype=torch.float64)
    loss, penalty = LogisticR1(grad_scale=penalty_grad_scale("reference", 8, 32)).d_loss(D, reals, fakes, 0.5)
    D.zero_grad()
    loss.backward()
    got = {n: p.grad.clone() for n, p in D.named_parameters()}

    real, grads = reference_gradients(D, reals, 0.5, 32)
    fake = D(F.avg_pool2d(upscale(fakes, 4), 4), 0.5)
    r1 = grads.square().flatten(1).sum(dim=1)
    want = F.softplus(fake).mean() + F.softplus(-real).mean() + 5 * r1.mean()
    D.zero_grad()
    want.backward()

    torch.testing.assert_close(penalty, r1.mean().detach())
    torch.testing.assert_close(loss, want.detach())
    for name, p in D.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)


def test_gp_scale_in_the_spec():
    spec = parse_spec("run: r\ndataset: d\nstorage: s\nresolution: 64\n")
    assert spec.gp_scale == "reference"
    assert penalty_grad_scale(spec.gp_scale, 4, spec.resolution) == 1 / 16
    assert penalty_grad_scale(spec.gp_scale, 64, spec.resolution) == 1.0
    assert penalty_grad_scale("local", 4, spec.resolution) == 1.0
    local = spec.model_copy(update={"gp_scale": "local"})
    assert local.model_hash() != spec.model_hash()  # it changes training: a run cannot resume across it
    assert make_loss("wgan-gp", 0.25).grad_scale == 0.25


@pytest.mark.parametrize("name", ["wgan-gp", "logistic-r1"])
def test_adam_steps_keep_losses_finite_and_ema_lags(name):
    torch.manual_seed(4)
    G = Generator(8, 3, LATENT, fmap_base=64, fmap_max=16)
    D = Discriminator(8, 3, fmap_base=64, fmap_max=16)
    G_ema = copy.deepcopy(G).requires_grad_(False)
    G_init = copy.deepcopy(G)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.0, 0.99), eps=1e-8)
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.0, 0.99), eps=1e-8)
    loss = make_loss(name)
    data = torch.randn(16, 3, 8, 8)
    for step in range(4):
        alpha = step / 4
        reals = fade_images(data[step * 4 : step * 4 + 4], alpha)
        fakes = G(torch.randn(4, LATENT), alpha)
        d_loss, penalty = loss.d_loss(D, reals, fakes.detach(), alpha)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss = loss.g_loss(D, G(torch.randn(4, LATENT), alpha), alpha)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        update_ema(G_ema, G, 0.9)
        assert all(torch.isfinite(v) for v in (d_loss, penalty, g_loss))
    z = torch.randn(4, LATENT)
    with torch.no_grad():
        out, out_ema, out_init = G(z), G_ema(z), G_init(z)
    assert torch.isfinite(out_ema).all()
    assert not torch.allclose(out_ema, out) and not torch.allclose(out_ema, out_init)
    w, w_ema, w0 = (m.blocks["4"].conv.weight for m in (G, G_ema, G_init))
    # EMA moves towards G but lags behind it.
    assert 0 < (w_ema - w0).abs().sum() < (w - w0).abs().sum()


def test_update_ema_math_and_buffers():
    torch.manual_seed(5)
    ema, net = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        for p in [*ema.parameters(), *net.parameters()]:
            p.normal_()
        net.running_mean.normal_()
    old = [p.clone() for p in ema.parameters()]
    update_ema(ema, net, 0.75)
    for p_ema, p_old, p in zip(ema.parameters(), old, net.parameters()):
        torch.testing.assert_close(p_ema, 0.75 * p_old + 0.25 * p)
    assert torch.equal(ema.running_mean, net.running_mean)


def test_make_loss():
    assert isinstance(make_loss("wgan-gp"), WGANGP)
    assert isinstance(make_loss("logistic-r1"), LogisticR1)
    assert WGANGP() == WGANGP(wgan_lambda=10.0, drift=0.001, target=1.0, grad_scale=1.0)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        make_loss("hinge")
