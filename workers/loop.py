"""One phase of data-parallel ProGAN training: the function every Ray Train worker runs.

Gradients are averaged with one all-reduce per network per step, as stylegan2-ada-pytorch does, instead of
wrapping the networks in DistributedDataParallel: a WGAN-GP step runs D three times before one backward,
which DDP's reducer does not allow. Every decision that all ranks must agree on (stop, checkpoint, end of
phase) is taken on step counts or broadcast from rank 0, so no rank waits in a collective alone.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from service.spec import Phase, Spec
from workers.checkpoint import TrainingState, fresh_state, load_payload, module_tensors, state_from_payload
from workers.commit import read_committed
from workers.data import PhaseStream
from workers.losses import make_loss, penalty_grad_scale, update_ema
from workers.networks import fade_images
from workers.storage import filesystem

REPORT_SECONDS = 2.0  # how often each rank sends its figures to the run actor
RELEASE_POLL_SECONDS = 0.05  # how often a waiting group asks whether its phase is released
CONTROL_STEPS = 4  # how often rank 0's view of a stop request is broadcast
CHECKPOINT_FILE = "checkpoint.pt"


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


def broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        dist.broadcast(t, src=0)


def stream_seed(spec: Spec, phase: Phase, phase_images: int) -> int:
    """A resumed phase draws a fresh data stream rather than replaying the images it has already seen."""
    digest = hashlib.sha256(f"{spec.seed}/{phase.index}/{phase_images}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def wait_for_release(actor, phase_index: int) -> bool:
    """The coordinator brings a phase's group up while the previous phase is still finishing; the group trains
    once that phase is committed (True), or returns at once when the hand-off is called off (False)."""
    while (go := ray.get(actor.may_start.remote(phase_index))) is None:
        time.sleep(RELEASE_POLL_SECONDS)
    return go


def load_start_state(spec: Spec, phase: Phase, init_checkpoint: str | None, total_before: int,
                     device: torch.device) -> TrainingState:
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as d:
            payload = load_payload(Path(d, CHECKPOINT_FILE).read_bytes())
    elif init_checkpoint is not None:  # the previous phase's commit, verified before it is loaded
        fs, path = filesystem(init_checkpoint, spec.storage_options)
        payload = load_payload(read_committed(fs, path, spec, init_checkpoint))
    else:
        return fresh_state(spec, phase.index, phase.resolution, phase.lr, device)
    return state_from_payload(payload, spec, phase.index, phase.resolution, phase.lr, total_before, device)


def report_checkpoint(state: TrainingState, rank: int, metrics: dict) -> float:
    """Persist a Ray Train checkpoint (rank 0 writes it, every rank reports); returns the seconds it took."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            Path(d, CHECKPOINT_FILE).write_bytes(state.to_bytes())
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)
    return time.monotonic() - start


def train_step(state: TrainingState, loss, reals: torch.Tensor, alpha: float, fading: bool, spec: Spec,
               world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """One D step and one G step on one batch of reals, as the reference code alternates them. An update whose
    loss or gradients are non-finite on any rank is skipped on every rank, with the rest of the step (optimizer
    state and EMA untouched); the last value says whether the step was applied."""
    G, D = state.G, state.D
    batch = reals.shape[0]
    if fading:
        reals = fade_images(reals, alpha)

    D.requires_grad_(True)
    with torch.no_grad():
        fakes = G(torch.randn(batch, spec.latent_size, device=reals.device), alpha)
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
    update_ema(state.G_ema, G, spec.ema_beta)
    return d_loss.detach(), g_loss.detach(), penalty, True


def train_phase(config: dict) -> None:
    """Ray Train's per-worker function. config: spec, phase, init_checkpoint, total_before, actor."""
    spec = Spec.model_validate(config["spec"])
    phase = Phase(**config["phase"])
    actor = config["actor"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if not wait_for_release(actor, phase.index):
        return

    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))  # threads beyond the reserved CPUs only contend
    torch.manual_seed(spec.seed * 1000 + phase.index)  # identical new layers on every rank
    state = load_start_state(spec, phase, config["init_checkpoint"], config["total_before"], device)
    if world > 1:
        broadcast_from_rank0(module_tensors(state.G, state.D, state.G_ema))
    torch.manual_seed(stream_seed(spec, phase, state.phase_images) + rank)  # each rank its own latents
    actor.worker_started.remote(rank, phase.index, state.phase_images, world, ray.get_runtime_context().get_node_id())
    if rank == 0:
        print(f"phase {phase.name}: {world} worker(s) start at {state.phase_images}/{phase.images} images", flush=True)

    loss = make_loss(spec.loss, penalty_grad_scale(spec.gp_scale, phase.resolution, spec.resolution))
    batch = phase.batch // world  # an elastic group of any size trains the same global batch
    stream = PhaseStream(
        spec.dataset, phase.resolution, batch, rank, world, stream_seed(spec, phase, state.phase_images),
        storage_options=spec.storage_options, mirror=spec.mirror, num_workers=spec.data_workers,
    )
    checkpoint_every = max(phase.batch, int(spec.checkpoint_kimg * 1000) // phase.batch * phase.batch)
    next_checkpoint = (state.phase_images // checkpoint_every + 1) * checkpoint_every
    stop = torch.zeros(1, device=device)
    stop_reply = None
    last_report, images_since = time.monotonic(), 0
    step = 0

    batches = iter(stream)
    first_step_at = last_step_at = 0.0  # wall clock, so the driver can time the switch between phases
    while state.phase_images < phase.images:
        alpha = phase.alpha(state.phase_images)
        d_loss, g_loss, penalty, finite = train_step(state, loss, next(batches).to(device, non_blocking=True), alpha,
                                             phase.fading, spec, world)
        last_step_at = time.time()
        first_step_at = first_step_at or last_step_at
        state.phase_images += phase.batch
        state.total_images += phase.batch
        images_since += batch
        step += 1

        now = time.monotonic()
        if now - last_report >= REPORT_SECONDS or state.phase_images >= phase.images:
            stats = {
                "phase_images": state.phase_images, "alpha": phase.alpha(state.phase_images),
                "images_per_second": images_since / (now - last_report), "loss_g": g_loss.item(),
                "loss_d": d_loss.item(), "penalty": penalty.item(), "corrupt_samples": stream.corrupt_samples,
                "stream": os.getpid(),
            }  # fmt: skip
            reply = actor.report.remote(rank, world, stats)
            if rank == 0:
                stop_reply = stop_reply or reply
            last_report, images_since = now, 0
        if step % CONTROL_STEPS == 0:
            if rank == 0 and stop_reply is not None and ray.wait([stop_reply], timeout=0)[0]:
                stop.fill_(float(ray.get(stop_reply)))
                stop_reply = None
            if world > 1:
                dist.broadcast(stop, src=0)
            if stop.item():
                break
        if state.phase_images >= next_checkpoint and state.phase_images < phase.images:
            seconds = report_checkpoint(state, rank, {"phase_images": state.phase_images, "done": False})
            if rank == 0:
                actor.checkpoint_committed.remote(seconds)
            next_checkpoint += checkpoint_every

    done = state.phase_images >= phase.images
    # steps 2…N, after the first one has paid for warm-up
    images_per_second = (step - 1) * phase.batch / (last_step_at - first_step_at) if step > 1 else 0.0
    seconds = report_checkpoint(state, rank, {
        "phase_images": state.phase_images, "done": done, "total_images": state.total_images,
        "first_step_at": first_step_at, "last_step_at": last_step_at, "images_per_second": images_per_second,
    })  # fmt: skip
    if rank == 0:
        actor.checkpoint_committed.remote(seconds)
