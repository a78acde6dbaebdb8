"""GAN losses and the generator EMA.

WGAN-GP follows the reference loss.py (D_wgangp_acgan / G_wgan_acgan without labels): Wasserstein loss,
gradient penalty on random real/fake mixes with target norm 1, and a drift term on the real scores that
keeps D's output from wandering off. LogisticR1 is the non-saturating logistic loss with an R1 penalty on
reals, as in later NVIDIA work. Both are plain functions of D's outputs, so nothing here depends on DDP.

Where the penalty's gradient is taken (`gp_scale` in the spec): the reference code feeds D every image at the
final resolution R (below R the reals and G's output are nearest-upscaled by 2^lod and D's fromRGB path
average-pools them back), so its penalty is on the gradient w.r.t. the R×R input. Pooling a nearest upscale
returns the image, and the gradient through an s×s average pool is the r×r gradient spread over s² pixels at
1/s² each, so ‖∇_{x_R} D‖ = ‖∇_{x_r} D‖ · r / R exactly: `grad_scale` = r / R applies that factor to the
per-sample norm instead of running D on R×R images ("reference"); 1 penalises the gradient at the phase's own
resolution r ("local", the common PyTorch behaviour). R1 is a squared norm, so it takes the factor squared:
StyleGAN, where NVIDIA's logistic + R1 loss comes from, grows progressively with the same upscaled inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Loss(Protocol):
    def d_loss(self, D: nn.Module, reals: Tensor, fakes: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
        """Return (total D loss, penalty value detached); fakes arrive detached from G."""
        ...

    def g_loss(self, D: nn.Module, fakes: Tensor, alpha: float) -> Tensor: ...


def penalty_grad_scale(gp_scale: str, resolution: int, final_resolution: int) -> float:
    """The factor from ‖∇_{x_r} D‖ at the phase's resolution to the norm the penalty is on (see above)."""
    return resolution / final_resolution if gp_scale == "reference" else 1.0


def widen(x: Tensor) -> Tensor:
    """bf16 scores and gradients (autocast, `precision: bf16`) to fp32 before they are squared and averaged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def input_gradients(D: nn.Module, x: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """D's scores on x and d(sum of scores)/dx, kept in the graph so a penalty on it can be trained."""
    x = x.detach().requires_grad_(True)
    scores = D(x, alpha)
    (grads,) = torch.autograd.grad(scores.sum(), x, create_graph=True)
    return scores, grads


@dataclass
class WGANGP:
    wgan_lambda: float = 10.0
    drift: float = 0.001
    target: float = 1.0
    grad_scale: float = 1.0  # r / R for the reference's penalty below the final resolution, else 1

    def d_loss(self, D: nn.Module, reals: Tensor, fakes: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
        # Reals and fakes in one forward, each scored as its own minibatch-stddev set: the scores of two forwards
        # in one pass through the network. The mixes need their own forward: their input gradient is penalised.
        real, fake = widen(D(torch.cat([reals, fakes]), alpha, sets=2)).squeeze(1).chunk(2)
        mix = torch.rand(reals.shape[0], 1, 1, 1, device=reals.device, dtype=reals.dtype)
        _, grads = input_gradients(D, torch.lerp(reals, fakes, mix), alpha)
        penalty = (widen(grads).flatten(1).norm(dim=1) * self.grad_scale - self.target).square()
        loss = fake - real + penalty * (self.wgan_lambda / self.target**2) + real.square() * self.drift
        return loss.mean(), penalty.mean().detach()

    def g_loss(self, D: nn.Module, fakes: Tensor, alpha: float) -> Tensor:
        return -widen(D(fakes, alpha)).mean()


@dataclass
class LogisticR1:
    gamma: float = 10.0
    grad_scale: float = 1.0  # as in WGANGP; R1 is a squared norm, so it takes grad_scale²

    def d_loss(self, D: nn.Module, reals: Tensor, fakes: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
        real, grads = input_gradients(D, reals, alpha)
        fake = D(fakes, alpha)
        r1 = widen(grads).square().flatten(1).sum(dim=1) * self.grad_scale**2
        real, fake = widen(real), widen(fake)
        loss = F.softplus(fake).mean() + F.softplus(-real).mean() + r1.mean() * (self.gamma / 2)
        return loss, r1.mean().detach()

    def g_loss(self, D: nn.Module, fakes: Tensor, alpha: float) -> Tensor:
        return F.softplus(-widen(D(fakes, alpha))).mean()


LOSSES = {"wgan-gp": WGANGP, "logistic-r1": LogisticR1}


def make_loss(name: str, grad_scale: float = 1.0) -> Loss:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    return LOSSES[name](grad_scale=grad_scale)


@torch.no_grad()
def update_ema(g_ema: nn.Module, g: nn.Module, beta: float) -> None:
    """g_ema <- beta * g_ema + (1 - beta) * g for parameters; buffers are copied (they are not averages)."""
    torch._foreach_lerp_(list(g_ema.parameters()), list(g.parameters()), 1 - beta)  # one call, not one a tensor
    for b_ema, b in zip(g_ema.buffers(), g.buffers(), strict=True):
        b_ema.copy_(b)
