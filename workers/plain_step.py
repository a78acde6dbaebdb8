"""The training step written the obvious way: the yardstick that `workers.step.train_step` is held to.

tests/test_step_equivalence.py runs both from the same seed and compares losses and weights;
bench/step_bench.py times both in one sitting. Three D forwards for WGAN-GP (reals, fakes, mixes), Adam and
the EMA one tensor at a time, fp32 throughout.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from service.spec import Spec
from workers.checkpoint import TrainingState
from workers.losses import WGANGP, input_gradients
from workers.networks import fade_images
from workers.step import reduce_grads


def plain_wgan_gp(loss: WGANGP, D: nn.Module, reals: Tensor, fakes: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    real = D(reals, alpha)
    fake = D(fakes, alpha)
    mix = torch.rand(reals.shape[0], 1, 1, 1, device=reals.device, dtype=reals.dtype)
    _, grads = input_gradients(D, torch.lerp(reals, fakes, mix), alpha)
    penalty = (grads.flatten(1).norm(dim=1) * loss.grad_scale - loss.target).square()
    total = (
        fake.squeeze(1)
        - real.squeeze(1)
        + penalty * (loss.wgan_lambda / loss.target**2)
        + real.squeeze(1).square() * loss.drift
    )
    return total.mean(), penalty.mean().detach()


def plain_state(state: TrainingState) -> TrainingState:
    """The same state with NCHW weights and single-tensor Adam, as the obvious code would build it."""
    for net in (state.G, state.D, state.G_ema):
        net.to(memory_format=torch.contiguous_format)

    def adam(params, opt):
        return torch.optim.Adam(params, lr=opt.param_groups[0]["lr"], betas=(0.0, 0.99), eps=1e-8, foreach=False)

    return dataclasses.replace(state, opt_G=adam(state.G.parameters(), state.opt_G),
                               opt_D=adam(state.D.parameters(), state.opt_D))


@torch.no_grad()
def plain_ema(g_ema: nn.Module, g: nn.Module, beta: float) -> None:
    for p_ema, p in zip(g_ema.parameters(), g.parameters(), strict=True):
        p_ema.lerp_(p, 1 - beta)


def plain_step(state: TrainingState, loss, reals: Tensor, alpha: float, fading: bool, spec: Spec,
               world: int) -> tuple[Tensor, Tensor, Tensor, bool]:
    G, D = state.G, state.D
    batch = reals.shape[0]
    if fading:
        reals = fade_images(reals, alpha)

    D.requires_grad_(True)
    with torch.no_grad():
        fakes = G(torch.randn(batch, spec.latent_size, device=reals.device), alpha)
    if isinstance(loss, WGANGP):
        d_loss, penalty = plain_wgan_gp(loss, D, reals, fakes, alpha)
    else:
        d_loss, penalty = loss.d_loss(D, reals, fakes, alpha)
    state.opt_D.zero_grad(set_to_none=True)
    d_loss.backward()
    if not reduce_grads(D, d_loss, world):
        return d_loss.detach(), torch.full_like(d_loss, torch.nan), penalty, False
    state.opt_D.step()

    D.requires_grad_(False)
    g_loss = loss.g_loss(D, G(torch.randn(batch, spec.latent_size, device=reals.device), alpha), alpha)
    state.opt_G.zero_grad(set_to_none=True)
    g_loss.backward()
    if not reduce_grads(G, g_loss, world):
        return d_loss.detach(), g_loss.detach(), penalty, False
    state.opt_G.step()
    plain_ema(state.G_ema, G, spec.ema_beta)
    return d_loss.detach(), g_loss.detach(), penalty, True
