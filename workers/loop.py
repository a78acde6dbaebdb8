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
from workers.commit import CheckpointError, read_committed
from workers.data import PhaseStream
from workers.faults import NonFiniteFault
from workers.losses import make_loss, penalty_grad_scale, update_ema
from workers.networks import fade_images
from workers.storage import filesystem, with_retries

REPORT_SECONDS = 2.0  # how often each rank sends its figures to the run actor
RELEASE_POLL_SECONDS = 0.05  # how often a waiting group asks whether its phase is released
CONTROL_STEPS = 4  # how often rank 0's view of a stop request is broadcast
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_DIGEST = "checkpoint.sha256"  # beside each in-phase checkpoint, so that a torn one is told, not half-loaded


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


def stream_seed(spec: Spec, phase: Phase, phase_images: int, rollbacks: int = 0) -> int:
    """A resumed phase draws a fresh data stream rather than replaying the images it has already seen; a phase
    rolled back draws another one again, rather than the data and latents that led it to non-finite steps."""
    key = f"{spec.seed}/{phase.index}/{phase_images}" + (f"/rollback-{rollbacks}" if rollbacks else "")
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "little")


def wait_for_release(actor, phase_index: int) -> bool:
    """The coordinator brings a phase's group up while the previous phase is still finishing; the group trains
    once that phase is committed (True), or returns at once when the hand-off is called off (False)."""
    while (go := ray.get(actor.may_start.remote(phase_index))) is None:
        time.sleep(RELEASE_POLL_SECONDS)
    return go


def read_in_phase(fs, path: str) -> dict:
    """One in-phase checkpoint (a Ray Train checkpoint folder), checked against its sha256 sidecar."""
    from pyarrow.fs import FileType

    files = {i.base_name: i for i in fs.get_file_info([f"{path}/{CHECKPOINT_FILE}", f"{path}/{CHECKPOINT_DIGEST}"])}
    if files[CHECKPOINT_FILE].type is not FileType.File:
        raise CheckpointError(f"{path}: {CHECKPOINT_FILE} is missing")
    with fs.open_input_stream(f"{path}/{CHECKPOINT_FILE}") as f:
        data = f.read()
    if files[CHECKPOINT_DIGEST].type is FileType.File:
        with fs.open_input_stream(f"{path}/{CHECKPOINT_DIGEST}") as f:
            if hashlib.sha256(data).hexdigest() != f.read().decode().strip():
                raise CheckpointError(f"{path}: {CHECKPOINT_FILE} does not match its sha256 (torn or corrupt)")
    return load_payload(data, path)


def in_phase_payload(checkpoint: ray.train.Checkpoint) -> tuple[dict | None, list[str]]:
    """The newest in-phase checkpoint that verifies, from Ray Train's latest back through the older ones it keeps
    (num_to_keep), and what was wrong with each newer one. None when none verifies."""
    from pyarrow.fs import FileSelector, FileType

    fs, latest = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, name = latest.rsplit("/", 1)
    older = sorted((i.path for i in fs.get_file_info(FileSelector(parent)) if i.type is FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    problems = []
    for path in (latest, *older):
        try:
            return read_in_phase(fs, path), problems
        except CheckpointError as e:
            problems.append(str(e))
    return None, problems


def load_start_state(spec: Spec, phase: Phase, init_checkpoint: str | None, total_before: int, rank: int, actor,
                     device: torch.device) -> TrainingState:
    """Where the phase (re)starts: its latest in-phase checkpoint that verifies (a torn one falls back to the one
    before it, then to the phase's start, in one line), else the previous phase's commit, else fresh networks."""
    payload = None
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        payload, problems = in_phase_payload(resumed)
        if problems and rank == 0:
            actor.note.remote(f"phase {phase.name}: {'; '.join(problems)}: resuming from "
                              f"{'the checkpoint before it' if payload else 'the start of the phase'}")
    if payload is None and init_checkpoint is not None:  # the previous phase's commit, verified before it is loaded
        fs, path = filesystem(init_checkpoint, spec.storage_options)
        payload = load_payload(with_retries(lambda: read_committed(fs, path, spec, init_checkpoint),
                                            f"{init_checkpoint}: read", spec.storage_options.retry_seconds))
    if payload is None:
        return fresh_state(spec, phase.index, phase.resolution, phase.lr, device)
    return state_from_payload(payload, spec, phase.index, phase.resolution, phase.lr, total_before, device)


def report_checkpoint(state: TrainingState, rank: int, metrics: dict) -> float:
    """Persist a Ray Train checkpoint (rank 0 writes it, every rank reports); returns the seconds it took."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            data = state.to_bytes()
            Path(d, CHECKPOINT_FILE).write_bytes(data)
            Path(d, CHECKPOINT_DIGEST).write_text(hashlib.sha256(data).hexdigest())
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


def open_stream(spec: Spec, phase: Phase, state: TrainingState, rank: int, world: int, rollbacks: int) -> PhaseStream:
    """The phase's data from where `state` is, with this rank's latents seeded to match."""
    seed = stream_seed(spec, phase, state.phase_images, rollbacks)
    torch.manual_seed(seed + rank)  # each rank its own latents
    return PhaseStream(spec.dataset, phase.resolution, phase.batch_per_worker, rank, world, seed,
                       storage_options=spec.storage_options, mirror=spec.mirror, num_workers=spec.data_workers)


def train_phase(config: dict) -> None:
    """Ray Train's per-worker function. config: spec, phase, init_checkpoint, total_before, actor, fault.

    Non-finite steps: every rank agrees on each step's `finite` (see reduce_grads), so every rank counts the same
    streak and, at spec.nonfinite_rollback_steps in a row, rolls back at the same step, in place: each reloads
    the last good state it kept in memory (the bytes of the latest in-phase checkpoint taken after a finite step,
    or the phase's start) and continues with a fresh data and latent seed. Raising instead would have Ray Train
    restart the group from its latest checkpoint, which may hold the streak's start, and would spend a
    max_failures meant for lost workers. More than spec.max_rollbacks rollbacks in a phase fail the run: rank 0
    tells the run actor why, and every rank returns."""
    spec = Spec.model_validate(config["spec"])
    phase = Phase(**config["phase"])
    actor = config["actor"]
    fault = NonFiniteFault(**config["fault"]) if config.get("fault") else None
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if not wait_for_release(actor, phase.index):
        return

    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))  # threads beyond the reserved CPUs only contend
    torch.manual_seed(spec.seed * 1000 + phase.index)  # identical new layers on every rank
    state = load_start_state(spec, phase, config["init_checkpoint"], config["total_before"], rank, actor, device)
    if world > 1:
        broadcast_from_rank0(module_tensors(state.G, state.D, state.G_ema))
    good = state.to_bytes()  # the state a rollback returns to
    rollbacks = ray.get(actor.rollbacks.remote(phase.index))  # the phase's, also those before a restart
    actor.worker_started.remote(rank, phase.index, state.phase_images)
    if rank == 0:
        print(f"phase {phase.name}: {world} worker(s) start at {state.phase_images}/{phase.images} images", flush=True)

    loss = make_loss(spec.loss, penalty_grad_scale(spec.gp_scale, phase.resolution, spec.resolution))
    batch = phase.batch_per_worker
    stream = open_stream(spec, phase, state, rank, world, rollbacks)
    checkpoint_every = max(phase.batch, int(spec.checkpoint_kimg * 1000) // phase.batch * phase.batch)
    next_checkpoint = (state.phase_images // checkpoint_every + 1) * checkpoint_every
    stop = torch.zeros(1, device=device)
    stop_reply = None
    last_report, images_since = time.monotonic(), 0
    step = 0
    streak = 0  # non-finite steps in a row

    batches = iter(stream)
    first_step_at = last_step_at = 0.0  # wall clock, so the driver can time the switch between phases
    while state.phase_images < phase.images:
        alpha = phase.alpha(state.phase_images)
        reals = next(batches).to(device, non_blocking=True)
        if fault and rank == 0 and fault.poisons(phase.index, state.phase_images // phase.batch, rollbacks):
            reals[0] = float("nan")
        d_loss, g_loss, penalty, finite = train_step(state, loss, reals, alpha, phase.fading, spec, world)
        last_step_at = time.time()
        first_step_at = first_step_at or last_step_at
        state.phase_images += phase.batch
        state.total_images += phase.batch
        images_since += batch
        step += 1
        streak = 0 if finite else streak + 1
        if not finite and rank == 0:
            actor.nonfinite_step.remote(phase.index)
        if streak >= spec.nonfinite_rollback_steps:
            rollbacks += 1
            at = state.phase_images
            if rollbacks > spec.max_rollbacks:
                if rank == 0:
                    ray.get(actor.phase_failed.remote(phase.index, (
                        f"phase {phase.name}: {streak} non-finite steps in a row at {at} images after "
                        f"{rollbacks - 1} rollback(s), more than max_rollbacks = {spec.max_rollbacks}")))
                return
            state = state_from_payload(load_payload(good), spec, phase.index, phase.resolution, phase.lr,
                                       config["total_before"], device)
            streak = 0
            del batches  # its DataLoader workers end with it
            stream = open_stream(spec, phase, state, rank, world, rollbacks)
            batches = iter(stream)
            next_checkpoint = (state.phase_images // checkpoint_every + 1) * checkpoint_every
            if rank == 0:  # the driver prints it (a worker's own lines may not reach the console before it ends)
                actor.rolled_back.remote(phase.index, (
                    f"phase {phase.name}: {spec.nonfinite_rollback_steps} non-finite steps in a row at {at} images: "
                    f"rolled back to {state.phase_images} images with a fresh seed "
                    f"(rollback {rollbacks} of at most {spec.max_rollbacks})"))
            continue

        now = time.monotonic()
        if now - last_report >= REPORT_SECONDS or state.phase_images >= phase.images:
            stats = {
                "phase_images": state.phase_images, "alpha": phase.alpha(state.phase_images),
                "images_per_second": images_since / (now - last_report), "loss_g": g_loss.item(),
                "loss_d": d_loss.item(), "penalty": penalty.item(), "corrupt_samples": stream.corrupt_samples,
                "stream": f"{os.getpid()}/{rollbacks}",  # a rollback opens a new stream
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
            if streak == 0:
                good = state.to_bytes()
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
