"""One phase of data-parallel ProGAN training: the function every Ray Train worker runs.

Gradients are averaged with one all-reduce per network per step, as stylegan2-ada-pytorch does, instead of
wrapping the networks in DistributedDataParallel: a WGAN-GP step runs D three times before one backward,
which DDP's reducer does not allow. Every decision that all ranks must agree on (stop, checkpoint, end of
phase) is taken on step counts or broadcast from rank 0, so no rank waits in a collective alone.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import os
import time

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from service.spec import Phase, Spec
from workers.checkpoint import (TrainingState, fresh_state, load_payload, module_tensors, payload_bytes, snapshot,
                                state_from_payload)
from workers.checkpoint_writer import CHECKPOINT_DIGEST, CHECKPOINT_FILE, CheckpointWriter
from workers.commit import CheckpointError, read_committed
from workers.data import PhaseStream
from workers.faults import NonFiniteFault
from workers.losses import make_loss, penalty_grad_scale
from workers.step import keep_freed_memory, train_step
from workers.storage import filesystem, with_retries

REPORT_SECONDS = 2.0  # how often each rank sends its figures to the run actor
RELEASE_POLL_SECONDS = 0.05  # how often a waiting group asks whether its phase is released
CONTROL_STEPS = 4  # how often rank 0's view of a stop request is broadcast


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


def resumed_payload(phase: Phase, rank: int, actor) -> dict | None:
    """When Ray Train restarted the phase's worker group: its latest in-phase checkpoint that verifies (a torn one
    falls back to the one before it, in one line); None when there is none and the phase starts over."""
    resumed = ray.train.get_checkpoint()
    if resumed is None:
        return None
    payload, problems = in_phase_payload(resumed)
    if problems and rank == 0:
        actor.note.remote(f"phase {phase.name}: {'; '.join(problems)}: resuming from "
                          f"{'the checkpoint before it' if payload else 'the start of the phase'}")
    return payload


def load_start_state(spec: Spec, phase: Phase, resumed: dict | None, init_checkpoint: str | None,
                     total_before: int, device: torch.device) -> TrainingState:
    """Where the phase (re)starts: its own latest checkpoint, else the previous phase's commit, else fresh
    networks."""
    payload = resumed
    if payload is None and init_checkpoint is not None:  # the previous phase's commit, verified before it is loaded
        fs, path = filesystem(init_checkpoint, spec.storage_options)
        payload = load_payload(with_retries(lambda: read_committed(fs, path, spec, init_checkpoint),
                                            f"{init_checkpoint}: read", spec.storage_options.retry_seconds))
    if payload is None:
        return fresh_state(spec, phase.index, phase.resolution, phase.lr, device)
    return state_from_payload(payload, spec, phase.index, phase.resolution, phase.lr, total_before, device)


def open_stream(spec: Spec, phase: Phase, phase_images: int, rank: int, world: int, rollbacks: int,
                device: torch.device) -> PhaseStream:
    """The phase's data from `phase_images` on; each rollback draws a fresh stream. An elastic group of any size
    trains the same global batch."""
    return PhaseStream(spec.dataset, phase.resolution, phase.batch // world, rank, world,
                       stream_seed(spec, phase, phase_images, rollbacks), storage_options=spec.storage_options,
                       mirror=spec.mirror, num_workers=spec.data_workers, pin_memory=device.type == "cuda")


def train_phase(config: dict) -> None:
    """Ray Train's per-worker function. config: spec, phase, init_checkpoint, total_before, actor, fault.

    Non-finite steps: every rank agrees on each step's `finite` (see workers/step.py reduce_grads), so every rank
    counts the same streak and, at spec.nonfinite_rollback_steps in a row, rolls back at the same step, in place:
    each reloads the last good state it keeps in memory (a copy taken at the latest in-phase checkpoint after a
    finite step, or at the phase's start) and continues with a fresh data and latent seed. Raising instead would
    have Ray Train restart the group from its latest checkpoint, which may hold the streak's start, and would
    spend a max_failures meant for lost workers. More than spec.max_rollbacks rollbacks in a phase fail the run:
    rank 0 tells the run actor why, and every rank returns."""
    spec = Spec.model_validate(config["spec"])
    phase = Phase(**config["phase"])
    actor = config["actor"]
    fault = NonFiniteFault(**config["fault"]) if config.get("fault") else None
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))  # threads beyond the reserved CPUs only contend
    keep_freed_memory()
    # What needs no commit of the previous phase is done while that commit is being made: reading a restarted
    # group's own checkpoint, opening the data stream and decoding its first batch, and importing torch._dynamo,
    # which torch.optim imports when the first optimizer is built (1.0 to 1.3 s here, in every new worker).
    importlib.import_module("torch._dynamo")
    resumed = resumed_payload(phase, rank, actor)
    rollbacks = ray.get(actor.rollbacks.remote(phase.index))  # the phase's, also those before a restart
    stream = open_stream(spec, phase, resumed["phase_images"] if resumed else 0, rank, world, rollbacks, device)
    batches = iter(stream)
    batches = itertools.chain([next(batches)], batches)
    if not wait_for_release(actor, phase.index):
        return

    torch.manual_seed(spec.seed * 1000 + phase.index)  # identical new layers on every rank
    state = load_start_state(spec, phase, resumed, config["init_checkpoint"], config["total_before"], device)
    if world > 1:
        broadcast_from_rank0(module_tensors(state.G, state.D, state.G_ema))
    good = snapshot(state.payload())  # the state a rollback returns to
    torch.manual_seed(stream_seed(spec, phase, state.phase_images, rollbacks) + rank)  # each rank its own latents
    actor.worker_started.remote(rank, phase.index, state.phase_images, world, ray.get_runtime_context().get_node_id())
    if rank == 0:
        print(f"phase {phase.name}: {world} worker(s) start at {state.phase_images}/{phase.images} images", flush=True)

    loss = make_loss(spec.loss, penalty_grad_scale(spec.gp_scale, phase.resolution, spec.resolution))
    # A kill may cost at most checkpoint_every images, as with synchronous checkpoints: one is taken every half
    # interval and the loop waits for it, if still in flight, before it would train an interval past the latest
    # persisted one (see workers/checkpoint_writer.py).
    checkpoint_every = max(phase.batch, int(spec.checkpoint_kimg * 1000) // phase.batch * phase.batch)
    snapshot_every = max(phase.batch, checkpoint_every // 2 // phase.batch * phase.batch)
    next_checkpoint = (state.phase_images // snapshot_every + 1) * snapshot_every
    writer = CheckpointWriter(rank, state.phase_images, actor.checkpoint_committed.remote if rank == 0 else None)
    stop = torch.zeros(1, device=device)
    stop_reply = None
    last_report, images_since = time.monotonic(), 0
    step = 0
    streak = 0  # non-finite steps in a row

    # Wall clock, so the driver can time the switch between phases: when the first step began and ended, when the
    # last one ended.
    first_step_started_at = first_step_at = last_step_at = 0.0
    while state.phase_images < phase.images:
        if state.phase_images + phase.batch - writer.persisted_images > checkpoint_every:
            writer.wait()
        alpha = phase.alpha(state.phase_images)
        reals = next(batches).to(device, non_blocking=True)
        if fault and rank == 0 and fault.poisons(phase.index, state.phase_images // phase.batch, rollbacks):
            reals[0] = float("nan")
        first_step_started_at = first_step_started_at or time.time()
        d_loss, g_loss, penalty, finite = train_step(state, loss, reals, alpha, phase.fading, spec, world)
        last_step_at = time.time()
        first_step_at = first_step_at or last_step_at
        state.phase_images += phase.batch
        state.total_images += phase.batch
        images_since += reals.shape[0]
        step += 1
        streak = 0 if finite else streak + 1
        if not finite and rank == 0:
            actor.nonfinite_step.remote(phase.index)
        if streak >= spec.nonfinite_rollback_steps:
            rollbacks += 1
            at = state.phase_images
            if rollbacks > spec.max_rollbacks:
                writer.close()
                if rank == 0:
                    ray.get(actor.phase_failed.remote(phase.index, (
                        f"phase {phase.name}: {streak} non-finite steps in a row at {at} images after "
                        f"{rollbacks - 1} rollback(s), more than max_rollbacks = {spec.max_rollbacks}")))
                return
            # through bytes: a state loaded from `good` itself would share its tensors and change it as it trains
            state = state_from_payload(load_payload(payload_bytes(good)), spec, phase.index, phase.resolution,
                                       phase.lr, config["total_before"], device)
            streak = 0
            del batches  # its DataLoader workers end with it
            stream = open_stream(spec, phase, state.phase_images, rank, world, rollbacks, device)
            batches = iter(stream)
            torch.manual_seed(stream_seed(spec, phase, state.phase_images, rollbacks) + rank)
            next_checkpoint = (state.phase_images // snapshot_every + 1) * snapshot_every
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
            writer.save(state, {"phase_images": state.phase_images, "done": False})
            if streak == 0:
                good = snapshot(state.payload(), good)
            next_checkpoint += snapshot_every

    done = state.phase_images >= phase.images
    # steps 2…N, after the first one has paid for warm-up
    images_per_second = (step - 1) * phase.batch / (last_step_at - first_step_at) if step > 1 else 0.0
    writer.save(state, {
        "phase_images": state.phase_images, "done": done, "total_images": state.total_images,
        "first_step_started_at": first_step_started_at, "first_step_at": first_step_at, "last_step_at": last_step_at,
        "images_per_second": images_per_second,
    })  # fmt: skip
    writer.close()  # the final checkpoint is reported before the phase's function returns
