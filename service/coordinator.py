"""The Ray coordinator: walks the growth schedule, one Ray Train run per phase, and commits each phase.

For every phase it starts a TorchTrainer whose workers run `workers.loop.train_phase`; Ray Train restarts a
failed worker group from the phase's latest checkpoint (under `<run>/train/<phase>`). When the phase ends the
coordinator commits its checkpoint (checkpoint.pt, then COMMITTED), replaces state.json, and starts the
phase's evaluation (sample grid, SWD) as a Ray task that runs beside the next phase (service/phase_eval.py).
Killed at any point, running the same spec again continues where the store says.

Bringing up a Ray Train worker group takes seconds (a controller, its helper actors, the worker processes, the
process group), so the coordinator launches the next phase's trainer shortly before the current phase's last
step: that group comes up while the current one finishes, writes its final checkpoint and is committed, and
waits on the run actor until the coordinator releases it.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time
from dataclasses import asdict

import ray
from fsspec.implementations.local import LocalFileSystem
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from service.artifacts import run_artifacts
from service.console import PlainConsole, RunConsole
from service.phase_eval import PhaseEvaluations
from service.group_watch import GroupWatch, lost_group
from service.ray_logs import RayLogRouter, ray_log_folder
from service.run_actor import RunActor
from service.run_open import CoordinatorError, OpenedRun
from service.schedule import (
    Fail,
    NonFiniteSteps,
    Phase,
    PhaseCommitted,
    PhaseRecord,
    RunState,
    Start,
    Status,
    Stop,
    WorkersRestarted,
    transition,
)
from service.spec import Spec
from workers.loop import CHECKPOINT_FILE, train_phase
from workers.storage import StorageUnavailable

PROGRESS_SECONDS = 0.5  # how often the console gets the run actor's figures
STOP_POLL_SECONDS = 5.0  # how often the driver looks for a `progan stop` in the run store
POLL_SECONDS = 0.25  # how often the driver looks at a running phase for the moment to hand off
# Launch the next phase's trainer this long before the current phase's last step, so that its workers are up and
# waiting by then: at least HANDOFF_LEAD_SECONDS, and HANDOFF_LEAD_FACTOR times the last bring-up the driver saw
# (launch to the first worker waiting), which takes 4 s to well over 10 s on a busy 2-core machine (worker
# processes, imports, process group).
HANDOFF_LEAD_SECONDS = 4.0
HANDOFF_LEAD_FACTOR = 1.5
# A hand-off group that has been up this long while the current phase has still not returned, and whose rank 0
# has sent nothing for as long, means the current group lost a worker and waits for the resources the hand-off
# took: call the hand-off off. (A group still reporting is training: its end came later than the rate predicted.)
HANDOFF_GRACE_SECONDS = 20.0
# A phase whose worker group has not come up for this long, on a cluster without room for it, waits for workers.
WAITING_SECONDS = 5.0
# How often an elastic group checks whether the cluster has room for more workers (Ray's default: 60 s).
ELASTIC_RESIZE_SECONDS = 10.0
# Ray Train's controller polls its workers this often; its default of 2 s adds seconds to every phase switch.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
# A group start that waits this long for its placement group gives up, and Ray Train tries again with a fresh look
# at the cluster (infinitely: a fixed group waits for its nodes this way). Ray's 60 s would keep an elastic group
# that lost a node waiting a minute for it before it starts again with the survivors.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "15")
# Ray Train starts a preemption-watcher actor, a process of its own, with every worker group and stops it at every
# teardown, both on the phase switch's path. Nothing here reads its advance notice: a preempted node's workers are
# lost, counted and resumed from the latest checkpoint like any others.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def outage(e: BaseException) -> str | None:
    """What a StorageUnavailable behind a failure said, raised here or on a worker (Ray Train hands a worker
    group's failure over as text), or None when the failure is something else."""
    if isinstance(e, StorageUnavailable):
        return str(e)
    for line in str(e).splitlines():
        _, found, said = line.partition("StorageUnavailable: ")
        if found:
            return said.strip()
    return None


class PhaseFit:
    """One phase's `TorchTrainer.fit()` on a thread of its own, so that the next phase's can start beside it."""

    def __init__(self, phase: Phase, trainer: TorchTrainer) -> None:
        self.phase = phase
        self.launched_at = time.time()
        self.result: Result | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, args=(trainer,), name=f"fit-{phase.name}", daemon=True)
        self.thread.start()

    def _fit(self, trainer: TorchTrainer) -> None:
        try:
            self.result = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the coordinator's thread by outcome()
            self.error = e

    def done(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def outcome(self) -> Result:
        if self.error is not None:
            raise self.error
        return self.result


class Coordinator:
    def __init__(self, run: OpenedRun, *, metrics_port: int | None = None, console: RunConsole | None = None) -> None:
        spec = run.spec
        self.spec = spec
        self.store = run.store
        self.phases = run.phases
        self.fault = run.fault
        self.metrics_port = spec.metrics_port if metrics_port is None else metrics_port
        self.console = console or PlainConsole()
        self.stop_event = threading.Event()
        self.actor = None
        self.evaluations = PhaseEvaluations(spec, self.store)
        self.bringup = 0.0  # seconds the last worker group took from launch to its first worker waiting
        self.swd: dict[int, float] = {}  # phase index -> average SWD, as the evaluations come in
        self.waiting_for = 0  # workers the running phase waits for; 0 while it does not
        self.notes_shown = 0  # of the run actor's notes
        self.notes_lock = threading.Lock()

    # The run ----------------------------------------------------------------------------------------------

    def run(self, state: RunState, logs: str = "") -> RunState:
        """Train from `state` to the end, a stop or a failure; `logs` says where Ray's own lines go."""
        if state.status is Status.FINISHED:
            self.console.note(f"{self.store.url} is already FINISHED")
            return state
        self.actor = RunActor.options(
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                ray.get_runtime_context().get_node_id(), soft=False)
        ).remote(self.spec.run, self.metrics_port, self.spec.metrics_host)
        try:
            host, port = ray.get(self.actor.address.remote())
        except ray.exceptions.RayActorError as e:
            raise CoordinatorError(str(e.__cause__ or e).splitlines()[-1]) from None
        self.console.started(self.store.url, self.phases, f"http://{host}:{port}/metrics", logs)
        self.store.write_driver({"metrics": f"http://{host}:{port}/metrics", "started_at": time.time()})
        ray.get(self.actor.set_info.remote(self.build_info()))

        state = self.advance(state, Start())
        self.evaluate_missing(state)
        watcher = threading.Thread(target=self.watch, daemon=True)
        watcher.start()
        previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        fit, artifacts = None, []
        try:
            while state.status is Status.RUNNING:
                state, fit = self.run_phase(state, self.phases[state.phase], fit)
            if state.status is Status.FINISHED:
                artifacts = run_artifacts(self.store, self.spec)
        except BaseException as e:
            if (unreachable := outage(e)) is None:
                try:
                    state = self.advance(state, Fail(f"{type(e).__name__}: {e}".splitlines()[0][:500]))
                except StorageUnavailable as down:  # the store went down with the run (Ray Train's controller may
                    unreachable = str(down)  # be the first to meet it): an outage all the same
                else:
                    raise
            state = self.fail_in_outage(state, unreachable)
        finally:
            if fit is not None:
                self.call_off(fit)
            self.settle_evaluations()
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.stop_event.set()
            watcher.join(timeout=15)
            time.sleep(self.spec.metrics_linger_seconds)  # let Prometheus scrape the final state
            ray.kill(self.actor)
        self.console.finished(state, artifacts)
        return state

    def fail_in_outage(self, state: RunState, reason: str) -> RunState:
        """FAILED for an object store that stayed down longer than the retry budget: recorded in state.json if the
        store takes it by then; else state.json keeps saying RUNNING, which the next `progan train` resumes
        as it would a driver that died. Either way every commit made so far stays, and the same command resumes."""
        failed = transition(state, Fail(f"object store unreachable: {reason}"))
        try:
            self.store.write_state(failed)
        except StorageUnavailable:
            self.console.warning(f"state.json could not be updated to FAILED; it still says {state.status.value}")
        self.actor.set_state.remote("failed")
        return failed

    def advance(self, state: RunState, event) -> RunState:
        state = transition(state, event)
        self.store.write_state(state)
        if self.actor is not None:
            self.actor.set_state.remote(state.status.value.lower())
        return state

    def build_info(self) -> dict:
        from importlib.metadata import version

        import torch

        return {"spec_hash": self.spec.model_hash(), "version": version("progan-service"),
                "torch": torch.__version__, "ray": ray.__version__}

    def trainer(self, phase: Phase, init_checkpoint: str | None, total_before: int) -> TorchTrainer:
        spec = self.spec
        if isinstance(self.store.fs, LocalFileSystem):
            storage_path, storage_fs = self.store.layout.train, None
        else:
            from workers.arrow_fs import retrying_arrow_filesystem

            storage_path = self.store.layout.train
            storage_fs = retrying_arrow_filesystem(self.store.fs, spec.storage_options.retry_seconds)
        return TorchTrainer(
            train_phase,
            train_loop_config={
                "spec": spec.model_dump(mode="json"), "phase": asdict(phase), "init_checkpoint": init_checkpoint,
                "total_before": total_before, "actor": self.actor,
                "fault": asdict(self.fault) if self.fault else None,
            },
            scaling_config=ScalingConfig(
                num_workers=tuple(phase.workers) if phase.elastic else phase.workers, use_gpu=spec.use_gpu,
                resources_per_worker={"CPU": spec.cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})},
                # pack: fill one node (a pod of gpus_per_pod GPUs, NVLink) before the next; spread: one per node
                placement_strategy=spec.placement.upper(),
                elastic_resize_monitor_interval_s=ELASTIC_RESIZE_SECONDS,
            ),
            run_config=RunConfig(
                name=phase.name, storage_path=storage_path, storage_filesystem=storage_fs,
                failure_config=FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                callbacks=[GroupWatch(self.actor, phase.index)],
            ),
        )  # fmt: skip

    def images_before(self, phase: Phase) -> int:
        return sum(p.images for p in self.phases[: phase.index])

    def launch(self, phase: Phase) -> PhaseFit:
        """Start a phase's trainer; its workers wait for `release` before they load anything."""
        previous = self.phases[phase.index - 1] if phase.index else None
        init = self.store.url_of(self.store.layout.checkpoint(previous)) if previous else None
        return PhaseFit(phase, self.trainer(phase, init, self.images_before(phase)))

    def relaunch(self, phase: Phase, cause: str) -> PhaseFit:
        """Start a phase's trainer again after Ray Train gave up on a lost group it does not retry itself (see
        service/group_watch.py lost_group); it resumes from the phase's latest checkpoint, and the loss is counted
        and told like any restart."""
        ray.get(self.actor.group_restarting.remote(phase.index, cause))
        fit = self.launch(phase)
        self.actor.release.remote(phase.index)
        return fit

    def call_off(self, fit: PhaseFit) -> None:
        """Send a launched, unreleased phase's workers home: they return as soon as they are up, and free
        their resources without anyone waiting for them (a released phase is not affected)."""
        self.actor.call_off.remote(fit.phase.index)

    def run_phase(self, state: RunState, phase: Phase, fit: PhaseFit | None) -> tuple[RunState, PhaseFit | None]:
        """Train one phase (launched here, or already launched by the previous phase) and commit it. Returns the
        new state and the next phase's launched trainer, if its hand-off happened."""
        if self.stop_event.is_set():  # a stop that came between two phases
            if fit is not None:
                self.call_off(fit)
            return self.advance(state, Stop()), None
        ray.get(self.actor.set_phase.remote({
            "index": phase.index, "count": len(self.phases), "resolution": phase.resolution, "kind": phase.kind,
            "images_target": phase.images, "run_images_before": self.images_before(phase),
            "run_images_target": sum(p.images for p in self.phases), "workers": phase.workers,
            "workers_wanted": phase.max_workers,
        }))  # fmt: skip
        self.console.phase_started(phase)
        started = time.time()
        fit = fit or self.launch(phase)
        self.actor.release.remote(phase.index)
        following = self.phases[phase.index + 1] if phase.index + 1 < len(self.phases) else None
        handoff, handoff_tried = None, False
        restarts = relaunches = 0
        bringup_seen = False
        try:
            while True:
                if fit.done(POLL_SECONDS):
                    lost = lost_group(fit.error)
                    if lost is None or relaunches >= self.spec.max_failures:
                        break
                    relaunches += 1
                    fit = self.relaunch(phase, lost)
                state, restarts = self.watch_group(state, phase, restarts)
                if self.stop_event.is_set() and self.waiting_for:
                    # No worker is there to take the stop and write a last checkpoint: the phase's latest one is
                    # where it resumes. Ray Train's controller, still waiting, ends with this driver.
                    self.console.note(f"stopped in phase {phase.name} while it waited for workers; `progan train` "
                                      "resumes it from its latest checkpoint")
                    self.actor.set_waiting.remote(0)
                    self.waiting_for = 0
                    return self.advance(state, Stop()), None
                if self.evaluations.deferred and self.phase_reported():
                    self.evaluations.start_deferred()
                self.collect_evaluations()
                if following is None:
                    continue
                if not bringup_seen and (since := ray.get(self.actor.waiting_since.remote(phase.index))):
                    self.bringup, bringup_seen = since - fit.launched_at, True
                if not handoff_tried and self.nearly_done(phase):
                    self.console.note(f"phase {phase.name} is nearly done: bringing up {following.name}'s workers")
                    handoff, handoff_tried = self.launch(following), True
                elif handoff is not None and self.handoff_blocks(following):
                    self.console.warning(f"phase {phase.name} is restarting its workers: calling off {following.name}'s")
                    self.call_off(handoff)
                    handoff = None
            state, restarts = self.watch_group(state, phase, restarts)
            result = fit.outcome()
            state = self.finish_phase(state, phase, result, started)
        except BaseException:
            if handoff is not None:
                self.call_off(handoff)
            raise
        if state.status is not Status.RUNNING and handoff is not None:
            self.call_off(handoff)
            handoff = None
        return state, handoff

    def watch_group(self, state: RunState, phase: Phase, restarts: int) -> tuple[RunState, int]:
        """Write every restart of the phase's worker group to state.json as Ray Train's controller reports it, and
        say when the phase waits for workers the cluster has no room for (a lost node, a full cluster)."""
        group = ray.get(self.actor.group.remote(phase.index))
        if group["restarts"] > restarts:
            state = self.advance(state, WorkersRestarted(group["restarts"] - restarts))
        stalled = group.get("state") in ("scheduling", "waiting", "restarting") and \
            time.time() - group["since"] > WAITING_SECONDS
        room = self.room() if stalled else phase.max_workers
        waiting_for = phase.min_workers if room < phase.min_workers else 0
        if waiting_for and not self.waiting_for:
            self.console.warning(f"phase {phase.name}: waiting for {waiting_for} workers (the cluster has room for "
                                 f"{room}); it resumes from its latest checkpoint once they join")
        if waiting_for != self.waiting_for:
            self.actor.set_waiting.remote(waiting_for)
            self.waiting_for = waiting_for
        return state, group["restarts"]

    def room(self) -> int:
        """Workers the cluster's live nodes could hold, each node on its own (a worker does not span nodes)."""
        need = {"CPU": self.spec.cpus_per_worker, **({"GPU": 1} if self.spec.use_gpu else {})}
        return sum(int(min(node["Resources"].get(k, 0) // v for k, v in need.items()))
                   for node in ray.nodes() if node["Alive"])

    def nearly_done(self, phase: Phase) -> bool:
        """Rank 0's latest report puts the phase's end less than the hand-off lead away (see HANDOFF_LEAD_SECONDS)."""
        if self.stop_event.is_set():
            return False
        progress = ray.get(self.actor.progress.remote())
        left = phase.images - progress["rank0"].get("phase_images", 0)
        lead = max(HANDOFF_LEAD_SECONDS, HANDOFF_LEAD_FACTOR * self.bringup)
        return left <= 0 or left < progress["images_per_second"] * lead

    def handoff_blocks(self, following: Phase) -> bool:
        since = ray.get(self.actor.waiting_since.remote(following.index))
        if since is None or time.time() - since <= HANDOFF_GRACE_SECONDS:
            return False
        last_report = ray.get(self.actor.progress.remote())["rank0"].get("at", 0.0)
        return time.time() - last_report > HANDOFF_GRACE_SECONDS

    def show_notes(self, progress: dict) -> None:
        """The run actor's new console lines (rollbacks, torn checkpoints passed over), each once, whichever
        thread sees them first."""
        with self.notes_lock:
            for note in progress["notes"][self.notes_shown:]:
                self.console.warning(note)
            self.notes_shown = max(self.notes_shown, len(progress["notes"]))

    def finish_phase(self, state: RunState, phase: Phase, result: Result, started: float) -> RunState:
        progress = ray.get(self.actor.progress.remote())
        self.show_notes(progress)
        self.console.progress(progress)
        if progress["nonfinite_steps"] or progress["rollbacks"]:
            state = self.advance(state, NonFiniteSteps(progress["nonfinite_steps"], progress["rollbacks"]))
        if progress["failure"]:
            return self.advance(state, Fail(progress["failure"]))
        if not result.metrics.get("done"):
            self.console.note(f"stopped in phase {phase.name} at {result.metrics.get('phase_images', 0)} images")
            return self.advance(state, Stop())
        with result.checkpoint.as_directory() as d:
            checkpoint = open(f"{d}/{CHECKPOINT_FILE}", "rb").read()
        commit_started = time.monotonic()
        self.store.commit_phase(phase, checkpoint, self.spec)
        self.actor.checkpoint_committed.remote(time.monotonic() - commit_started)
        self.evaluations.defer(phase)
        if phase.index == len(self.phases) - 1:
            self.collect_evaluations(wait=True)  # a FINISHED run has every phase's artifacts
        m = result.metrics
        groups = ray.get(self.actor.group.remote(phase.index))["groups"]
        record = PhaseRecord(phase.index, phase.name, phase.images, round(time.time() - started, 3), time.time(),
                             m["first_step_at"], m["last_step_at"], round(m["images_per_second"], 2), tuple(groups),
                             m["first_step_started_at"])
        state = self.advance(state, PhaseCommitted(record))
        checkpoint_url = self.store.url_of(self.store.layout.checkpoint(phase))
        samples_url = self.store.url_of(self.store.layout.samples(phase))
        self.console.committed(phase, record, [checkpoint_url, samples_url], self.swd.get(phase.index))
        return state

    # End-of-phase evaluations ----------------------------------------------------------------------------------

    def evaluate_missing(self, state: RunState) -> None:
        """Start the evaluations that a driver killed with them in flight left undone."""
        for phase in self.evaluations.missing([self.phases[r.index] for r in state.committed]):
            self.console.note(f"phase {phase.name}: its sample grid or eval.json is missing, evaluating it again")
            self.evaluations.start(phase)

    def phase_reported(self) -> bool:
        """The running phase's rank 0 has sent its first figures: its group is up and training."""
        return "loss_d" in ray.get(self.actor.progress.remote())["rank0"]

    def collect_evaluations(self, wait: bool = False) -> None:
        """Pass on the evaluations that are done (all of them with `wait`): SWD to the metrics and the console."""
        for phase, evaluation in self.evaluations.wait_all() if wait else self.evaluations.finished():
            if evaluation.get("swd"):
                self.swd[phase.index] = evaluation["swd"]["avg"]
                self.actor.set_swd.remote(evaluation["swd"])
                self.console.evaluated(phase, evaluation["swd"]["avg"],
                                       self.store.url_of(self.store.layout.evaluation(phase)))

    def settle_evaluations(self) -> None:
        """Leaving after a stop or a failure: let the evaluations in flight write their artifacts."""
        try:
            self.collect_evaluations(wait=True)
        except Exception as e:  # noqa: BLE001 - the run's own outcome is what the caller sees
            self.console.warning(f"a phase evaluation failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")

    # Stop requests and progress ------------------------------------------------------------------------------

    def on_signal(self, signum: int, frame) -> None:
        if self.stop_event.is_set():
            raise KeyboardInterrupt
        self.console.note(f"{signal.Signals(signum).name}: stopping after a last checkpoint (again to abort)")
        self.request_stop()

    def request_stop(self) -> None:
        self.stop_event.set()
        self.actor.request_stop.remote()

    def watch(self) -> None:
        """Feed the console the run actor's figures and pass on a `progan stop` found in the store."""
        stop_checked = time.monotonic()
        while not self.stop_event.wait(PROGRESS_SECONDS):
            try:
                if time.monotonic() - stop_checked >= STOP_POLL_SECONDS:
                    stop_checked = time.monotonic()
                    if self.store.stop_requested():
                        self.console.note("stop requested through the run store")
                        self.request_stop()
                        self.store.clear_stop_request()
                        return
                progress = ray.get(self.actor.progress.remote(), timeout=10)
                self.show_notes(progress)
                self.console.progress(progress)
            except Exception as e:  # noqa: BLE001 - a missed progress report must never end the run
                self.console.warning(f"progress unavailable: {type(e).__name__}")


def train(run: OpenedRun, *, address: str | None = None, metrics_port: int | None = None,
          console: RunConsole | None = None) -> RunState:
    """Connect to (or start) Ray and train an opened run (service.run_open) to the end, a stop, or a failure.
    Ray's own log lines go to a file: under the run's logs/ folder for a local run store, else in Ray's log
    folder of this session."""
    console = console or PlainConsole()
    coordinator = Coordinator(run, metrics_port=metrics_port, console=console)
    if ray.is_initialized():  # a caller's own Ray session: its output stays where the caller sent it
        return coordinator.run(run.state, ray_log_folder())
    router = RayLogRouter(console)
    router.install()
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    else:
        start_own_cluster(handoff_cpus(run.phases, run.spec))
    router.connected()
    local = isinstance(run.store.fs, LocalFileSystem)
    return coordinator.run(run.state, router.open(os.path.join(run.store.path, "logs") if local else None))


def handoff_cpus(phases: list[Phase], spec: Spec) -> int:
    """CPUs a local cluster counts so that a phase's worker group and the next one's fit side by side: a group
    brought up for the hand-off only waits (it polls the run actor) until the phase before it is committed, but
    Ray counts its CPUs from the start, and on a cluster the running group fills it could not come up until that
    group had gone, putting its whole bring-up (worker processes, imports, process group) into the switch."""
    return max(os.cpu_count() or 1, math.ceil(2 * max(p.max_workers for p in phases) * spec.cpus_per_worker))


def start_own_cluster(cpus: int | None = None) -> None:
    """A local cluster of our own, never whichever one this machine happened to start last; `cpus` logical CPUs
    (see `handoff_cpus`), else one a core.

    Ray Train's placement-group cleaner asks the state API whether the controller is alive, and that API finds
    its cluster through /tmp/ray/ray_current_cluster, which names the last `ray start`, not this one. Pointing
    the API at our own dashboard (the cluster's processes inherit this environment) keeps the cleaner from
    stalling 12 s at every phase end on a stale address, or removing a live placement group because another
    cluster does not know our controller."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # Ray writes the cluster's auth token to ~/.ray/auth_token with the process's umask: keep it ours alone.
    umask = os.umask(0o077)
    try:
        ray.init(address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, log_to_driver=True, configure_logging=False)
    finally:
        os.umask(umask)
