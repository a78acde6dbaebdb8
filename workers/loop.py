"""One phase of data-parallel ProGAN training: the function every Ray Train worker runs.

Gradients are averaged with one all-reduce per network per step, as stylegan2-ada-pytorch does, instead of
wrapping the networks in DistributedDataParallel: a WGAN-GP step runs D three times before one backward,
which DDP's reducer does not allow. Every decision that all ranks must agree on (stop, checkpoint, end of
phase) is taken on step counts or broadcast from rank 0, so no rank waits in a collective alone.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from service.spec import Phase, Spec
from workers.checkpoint import TrainingState, fresh_state, load_payload, module_tensors, state_from_payload
from workers.checkpoint_writer import CHECKPOINT_FILE, CheckpointWriter
from workers.commit import read_committed
from workers.data import PhaseStream
from workers.losses import make_loss, penalty_grad_scale
from workers.step import train_step
from workers.storage import filesystem

REPORT_SECONDS = 2.0  # how often each rank sends its figures to the run actor
RELEASE_POLL_SECONDS = 0.05  # how often a waiting group asks whether its phase is released
CONTROL_STEPS = 4  # how often rank 0's view of a stop request is broadcast


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


def resumed_payload() -> dict | None:
    """This phase's latest Ray Train checkpoint, when Ray Train restarted its worker group."""
    resumed = ray.train.get_checkpoint()
    if resumed is None:
        return None
    with resumed.as_directory() as d:
        return load_payload(Path(d, CHECKPOINT_FILE).read_bytes())


def load_start_state(spec: Spec, phase: Phase, resumed: dict | None, init_checkpoint: str | None,
                     total_before: int, device: torch.device) -> TrainingState:
    if resumed is not None:
        payload = resumed
    elif init_checkpoint is not None:  # the previous phase's commit, verified before it is loaded
        fs, path = filesystem(init_checkpoint, spec.storage_options)
        payload = load_payload(read_committed(fs, path, spec, init_checkpoint))
    else:
        return fresh_state(spec, phase.index, phase.resolution, phase.lr, device)
    return state_from_payload(payload, spec, phase.index, phase.resolution, phase.lr, total_before, device)




def train_phase(config: dict) -> None:
    """Ray Train's per-worker function. config: spec, phase, init_checkpoint, total_before, actor."""
    spec = Spec.model_validate(config["spec"])
    phase = Phase(**config["phase"])
    actor = config["actor"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))  # threads beyond the reserved CPUs only contend
    # What needs no commit of the previous phase is done while that commit is being made: reading a restarted
    # group's own checkpoint, opening the data stream and decoding its first batch.
    resumed = resumed_payload()
    start_images = resumed["phase_images"] if resumed is not None else 0
    batch = phase.batch // world  # an elastic group of any size trains the same global batch
    stream = PhaseStream(
        spec.dataset, phase.resolution, batch, rank, world, stream_seed(spec, phase, start_images),
        storage_options=spec.storage_options, mirror=spec.mirror, num_workers=spec.data_workers,
        pin_memory=device.type == "cuda",
    )
    batches = iter(stream)
    batches = itertools.chain([next(batches)], batches)
    if not wait_for_release(actor, phase.index):
        return

    torch.manual_seed(spec.seed * 1000 + phase.index)  # identical new layers on every rank
    state = load_start_state(spec, phase, resumed, config["init_checkpoint"], config["total_before"], device)
    if world > 1:
        broadcast_from_rank0(module_tensors(state.G, state.D, state.G_ema))
    torch.manual_seed(stream_seed(spec, phase, state.phase_images) + rank)  # each rank its own latents
    actor.worker_started.remote(rank, phase.index, state.phase_images, world, ray.get_runtime_context().get_node_id())
    if rank == 0:
        print(f"phase {phase.name}: {world} worker(s) start at {state.phase_images}/{phase.images} images", flush=True)

    loss = make_loss(spec.loss, penalty_grad_scale(spec.gp_scale, phase.resolution, spec.resolution))
    checkpoint_every = max(phase.batch, int(spec.checkpoint_kimg * 1000) // phase.batch * phase.batch)
    next_checkpoint = (state.phase_images // checkpoint_every + 1) * checkpoint_every
    writer = CheckpointWriter(rank, actor.checkpoint_committed.remote if rank == 0 else None)
    stop = torch.zeros(1, device=device)
    stop_reply = None
    last_report, images_since = time.monotonic(), 0
    step = 0

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
            writer.save(state, {"phase_images": state.phase_images, "done": False})
            next_checkpoint += checkpoint_every

    done = state.phase_images >= phase.images
    # steps 2…N, after the first one has paid for warm-up
    images_per_second = (step - 1) * phase.batch / (last_step_at - first_step_at) if step > 1 else 0.0
    writer.save(state, {
        "phase_images": state.phase_images, "done": done, "total_images": state.total_images,
        "first_step_at": first_step_at, "last_step_at": last_step_at, "images_per_second": images_per_second,
    })  # fmt: skip
    writer.close()  # the final checkpoint is reported before the phase's function returns
