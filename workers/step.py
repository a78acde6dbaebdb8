"""The production training step: a D step and a G step on one batch, as the reference code alternates them.

Same math as `workers/plain_step.py`, the step written the obvious way that tests and bench/step_bench.py hold
this one to; what differs is how it runs. WGAN-GP scores reals and fakes in one D forward (each its own
minibatch-stddev set), images and conv weights are channels_last, Adam runs foreach on CPU and fused on CUDA
(workers/checkpoint.py), and the EMA is one foreach lerp. With `precision: bf16` the forwards and backwards run under bf16 autocast while the weights,
Adam, the equalized-LR weight scaling, the penalty's gradient norm and the loss reductions stay fp32.
"""

from __future__ import annotations

import ctypes

import torch
import torch.distributed as dist

from service.spec import Spec
from workers.checkpoint import TrainingState
from workers.losses import update_ema
from workers.networks import fade_images


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP_BELOW_BYTES = 1 << 30


def keep_freed_memory() -> None:
    """Have glibc keep freed blocks of up to 1 GiB in the process for the next step, once per training process.

    By default it hands a freed block above its mmap threshold back to the kernel, and the next step's block of
    the same size faults every page in again: 1.2 M minor page faults in 12 s of cpu-bench-32 steps at 32², and
    71 instead of 83 img/s (bench/step_bench.py). The process holds its peak step memory instead, which it
    needs every step anyway. Another C library keeps its own policy."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return
    mallopt(M_MMAP_THRESHOLD, KEEP_BELOW_BYTES)
    mallopt(M_TRIM_THRESHOLD, KEEP_BELOW_BYTES)


def reduce_grads(module: torch.nn.Module, loss: torch.Tensor, world_size: int) -> bool:
    """Average the gradients of `module` over all ranks in one flat all-reduce, and say whether the update is
    finite. The loss rides in the same buffer, so a non-finite loss or gradient on any rank makes the sum
    non-finite on every rank: all ranks agree to skip the update without a collective of its own."""
    params = [p for p in module.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.flatten() for p in params] + [loss.detach().reshape(1)])
    if world_size > 1:
        dist.all_reduce(flat)
        flat /= world_size
    finite = bool(torch.isfinite(flat).all())
    if world_size > 1 and finite:
        for p, g in zip(params, flat[:-1].split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
    return finite


def autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(state: TrainingState, loss, reals: torch.Tensor, alpha: float, fading: bool, spec: Spec,
               world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """One D step and one G step on one batch of reals. An update whose loss or gradients are non-finite on any
    rank is skipped on every rank, with the rest of the step (optimizer state and EMA untouched); the last value
    says whether the step was applied."""
    G, D = state.G, state.D
    batch, device = reals.shape[0], reals.device
    reals = reals.contiguous(memory_format=torch.channels_last)  # as the weights are (checkpoint.on_device)
    if fading:
        reals = fade_images(reals, alpha)

    D.requires_grad_(True)
    with torch.no_grad(), autocast(device, spec.precision):
        fakes = G(torch.randn(batch, spec.latent_size, device=device), alpha).to(reals.dtype)
    with autocast(device, spec.precision):
        d_loss, penalty = loss.d_loss(D, reals, fakes, alpha)
    state.opt_D.zero_grad(set_to_none=True)
    d_loss.backward()
    if not reduce_grads(D, d_loss, world):
        return d_loss.detach(), torch.full_like(d_loss, torch.nan), penalty, False
    state.opt_D.step()

    D.requires_grad_(False)
    with autocast(device, spec.precision):
        g_loss = loss.g_loss(D, G(torch.randn(batch, spec.latent_size, device=device), alpha), alpha)
    state.opt_G.zero_grad(set_to_none=True)
    g_loss.backward()
    if not reduce_grads(G, g_loss, world):
        return d_loss.detach(), g_loss.detach(), penalty, False
    state.opt_G.step()
    update_ema(state.G_ema, G, spec.ema_beta)
    return d_loss.detach(), g_loss.detach(), penalty, True
