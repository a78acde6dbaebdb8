"""The chaos campaign: trials of real faults against small runs, with the run's invariants checked after each.

    python bench/chaos.py --trials small          # one trial of each fault kind (~10 min)
    python bench/chaos.py --trials full           # 20 worker kills, 10 driver kills, 5 of every other kind
    python bench/chaos.py --kinds worker,nan --trials 3
    python bench/chaos.py --kinds s3 --trials 2 --s3-outage 60 60   # outages of a minute (5 to 30 s by default)

Everything is real and local: a SeaweedFS S3 server holds the dataset and the run store, a Ray cluster of a head
and two worker nodes (one `ray start` each) trains, and every fault is injected for real: SIGKILL of a Ray Train
worker (at a random moment, in a phase's last 2 s, or in the hand-off window), SIGKILL of the driver and a rerun
of the same `progan train`, SIGKILL of a worker node's raylet and the node started again, the S3 server stopped
and started, NaN injected into the loss through the documented fault hook, a flipped byte in a committed
checkpoint (the driver is killed first, the run resumed after), a flipped byte in a dataset shard.

After each trial one checker (`violations`) reads the run store and the driver's last metrics scrape:
- the run is FINISHED, every phase committed exactly once, and earlier commits are unchanged;
- every commit verifies (sha256, size, spec hash) and loads with `weights_only=True`;
- every phase trained exactly its planned images; images redone after a fault <= checkpoint interval + one batch;
- the restart, rollback and corrupt counters of the final scrape equal the faults injected.
It ends with a table: fault | trials | finished | invariants held | max images redone | max recovery s.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.runstore import RunStore  # noqa: E402
from service.schedule import Phase, Status, build_schedule  # noqa: E402
from service.spec import Spec, parse_spec  # noqa: E402
from tests.conftest import PROGAN, free_port, ray_train_workers, run_env, running_ray_cluster, running_s3_server  # noqa: E402
from workers.data import _draw_shards, read_manifest  # noqa: E402
from workers.loop import stream_seed  # noqa: E402

KINDS = ("worker", "driver", "node", "s3", "nan", "checkpoint", "shard")
FULL = {"worker": 20, "driver": 10, "node": 5, "s3": 5, "nan": 5, "checkpoint": 5, "shard": 5}
TRIAL_TIMEOUT = 600.0
SCRAPE_SECONDS = 0.25
WORKER_MOMENTS = ("random", "phase-end", "hand-off")
NODE_CPUS = 2  # each worker node holds a rank of the running group and one of the group brought up beside it


def chaos_spec(run: str, dataset: str, storage: str, metrics_port: int) -> dict:
    """4² → 8² in three phases of a few seconds each, checkpointing every 8 steps."""
    return {
        "run": run, "dataset": dataset, "storage": storage, "resolution": 8, "channels": 3, "latent_size": 32,
        "fmap_base": 128, "fmap_max": 32, "minibatch": 16, "workers": 2, "placement": "spread", "fade_kimg": 1.6, "stable_kimg": 1.6,
        "checkpoint_kimg": 0.128, "data_workers": 1, "metrics_port": metrics_port, "metrics_linger_seconds": 3,
        "eval": {"swd_images": 0, "sample_grid": 2},
    }  # fmt: skip


@dataclass
class Scrapes:
    """The driver's metrics endpoint, scraped every SCRAPE_SECONDS: the last scrape and rank 0's progress."""

    url: str
    last: dict[str, float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Scrapes:
        threading.Thread(target=self._loop, daemon=True).start()
        return self

    def _loop(self) -> None:
        while not self.stop.wait(SCRAPE_SECONDS):
            try:
                with urllib.request.urlopen(self.url, timeout=1) as r:
                    text = r.read().decode()
            except (OSError, http.client.HTTPException):  # not up yet, or cut off as the driver ended
                continue
            self.last = {f"{s.name}{json.dumps(dict(sorted(s.labels.items())))}": s.value
                         for family in text_string_to_metric_families(text) for s in family.samples}

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels` (0 when there is none)."""
        total = 0.0
        for key, v in self.last.items():
            metric, _, lab = key.partition("{")
            if metric == name and all(json.loads("{" + lab).get(k) == w for k, w in labels.items()):
                total += v
        return total


@dataclass
class Trial:
    kind: str
    number: int
    spec_path: Path
    spec: Spec
    store: RunStore
    env: dict[str, str]
    logs: Path
    scrapes: Scrapes
    fault_at: float = 0.0  # when the fault went in (monotonic)
    recovered_at: float = 0.0  # when training first got past the progress reported before the fault
    images_at_fault: tuple[int, int] = (-1, 0)  # (phase index, phase images) last reported before the fault
    # counter -> value the final scrape must show: -1 for at least one, None for any
    expected: dict[str, float | None] = field(default_factory=dict)
    commits: dict[int, bytes] = field(default_factory=dict)  # phase index -> its COMMITTED record, first seen
    recommitted: set[int] = field(default_factory=set)  # phases the fault is expected to commit a second time
    outputs: list[str] = field(default_factory=list)
    driver: subprocess.Popen | None = None

    @property
    def phases(self) -> list[Phase]:
        return build_schedule(self.spec)

    def start_driver(self, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.logs / f"{self.kind}-{self.number}-driver{len(self.outputs)}.log"
        self.outputs.append(str(log))
        self.driver = subprocess.Popen([PROGAN, "train", str(self.spec_path)], stdout=open(log, "w"),
                                       stderr=subprocess.STDOUT, env={**self.env, **(extra_env or {})})
        return self.driver

    def output(self) -> str:
        return "".join(Path(p).read_text() for p in self.outputs)

    def watch_commits(self) -> None:
        for phase in self.phases:
            if phase.index in self.commits and phase.index not in self.recommitted:
                continue
            with contextlib.suppress(FileNotFoundError, OSError):
                record = self.store.fs.cat_file(self.store.layout.committed_marker(phase))
                if phase.index not in self.commits:
                    self.commits[phase.index] = record

    def progress(self) -> tuple[int, int]:
        return int(self.scrapes.value("progan_phase_index")), int(self.scrapes.value("progan_phase_images_seen"))

    def mark_fault(self) -> None:
        self.images_at_fault = self.progress()
        self.fault_at = time.monotonic()

    def watch_recovery(self) -> None:
        if self.fault_at and not self.recovered_at and self.progress() > self.images_at_fault:
            self.recovered_at = time.monotonic()

    def wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.watch_commits()
            self.watch_recovery()
            if value := predicate():
                return value
            time.sleep(0.1)
        raise TimeoutError(f"trial {self.kind} {self.number}: timed out waiting for {what}")

    def driver_exit(self, timeout: float = TRIAL_TIMEOUT) -> int:
        self.wait(lambda: self.driver.poll() is not None, timeout, "the driver to end")
        return self.driver.returncode


# Faults --------------------------------------------------------------------------------------------------------


def moment_reached(trial: Trial, moment: str, rng: random.Random, start: float) -> bool:
    index, images = trial.progress()
    phase = trial.phases[min(index, len(trial.phases) - 1)]
    if moment == "random":
        return time.monotonic() > start
    rate = max(trial.scrapes.value("progan_train_images_per_second"), 1.0)
    if moment == "phase-end":
        return index < len(trial.phases) and 0 < phase.images - images < 2 * rate
    return "is nearly done: bringing up" in trial.output()  # the hand-off window


def fault_worker(trial: Trial, cluster, rng: random.Random) -> None:
    moment = WORKER_MOMENTS[trial.number % len(WORKER_MOMENTS)]
    start = time.monotonic() + rng.uniform(3, 25)
    trial.start_driver()
    trial.wait(lambda: moment_reached(trial, moment, rng, start) and ray_train_workers(cluster.token), 300, moment)
    victim = rng.choice(ray_train_workers(cluster.token))
    trial.mark_fault()
    os.kill(victim.pid, signal.SIGKILL)
    trial.expected["progan_worker_group_restarts_total"] = 1
    trial.driver_exit()


def fault_driver(trial: Trial, cluster, rng: random.Random) -> None:
    trial.start_driver()
    deadline = time.monotonic() + rng.uniform(5, 35)
    trial.wait(lambda: time.monotonic() > deadline, 60, "the moment")
    trial.mark_fault()
    trial.driver.send_signal(signal.SIGKILL)
    trial.driver.wait()
    trial.start_driver()
    trial.driver_exit()


def fault_node(trial: Trial, cluster, rng: random.Random) -> None:
    trial.start_driver()
    trial.wait(lambda: trial.progress()[1] > 0, 300, "training to start")
    time.sleep(rng.uniform(0, 8))
    name = rng.choice(sorted(cluster.nodes))
    node = cluster.nodes[name]
    trial.mark_fault()
    # A node lost while a group has workers on it costs at least one restart (how many depends on the moment); one
    # lost between two groups, or while a group is still being placed, may cost none.
    hosted = [p for p in ray_train_workers(cluster.token) if runs_on(p, node.raylet_pid)]
    node.kill()
    time.sleep(rng.uniform(5, 15))
    cluster.add_node(name, NODE_CPUS)
    cluster.wait_joined(name)
    trial.expected["progan_worker_group_restarts_total"] = -1 if hosted else None
    trial.driver_exit()


def runs_on(process, raylet_pid: int) -> bool:
    """Whether a worker process was started by that node's raylet (False once it is gone)."""
    try:
        return raylet_pid in {parent.pid for parent in process.parents()}
    except psutil.Error:
        return False


def fault_s3(trial: Trial, s3, rng: random.Random, outage: tuple[float, float]) -> None:
    trial.start_driver()
    trial.wait(lambda: trial.progress()[1] > 0, 300, "training to start")
    time.sleep(rng.uniform(0, 8))
    trial.mark_fault()
    s3.stop()
    time.sleep(rng.uniform(*outage))
    s3.start()
    trial.driver_exit()


def fault_nan(trial: Trial, rng: random.Random) -> None:
    phase = rng.randrange(len(trial.phases))
    step = rng.randrange(2, 20)
    count = trial.spec.nonfinite_rollback_steps
    trial.start_driver({"PROGAN_FAULT_NONFINITE": f"phase={phase},step={step},count={count}"})
    trial.wait(lambda: trial.progress() >= (phase, step * trial.phases[phase].batch), 300, "the poisoned steps")
    trial.mark_fault()
    trial.expected["progan_rollbacks_total"] = 1
    trial.expected["progan_nonfinite_steps_total"] = count
    trial.driver_exit()


def flip_byte(fs, path: str, rng: random.Random) -> int:
    data = bytearray(fs.cat_file(path))
    at = rng.randrange(len(data))
    data[at] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    return at


def fault_checkpoint(trial: Trial, rng: random.Random) -> None:
    """Kill the driver once a phase after the first is committed, flip a byte of the newest commit, resume."""
    trial.start_driver()
    trial.wait(lambda: trial.store.exists() and len(trial.store.read_state().committed) >= 2, 300,
               "two phases committed in state.json")
    trial.driver.send_signal(signal.SIGKILL)
    trial.driver.wait()
    bad = trial.phases[trial.store.read_state().committed[-1].index]
    trial.mark_fault()
    flip_byte(trial.store.fs, trial.store.layout.checkpoint(bad), rng)
    trial.recommitted.add(bad.index)
    trial.commits.pop(bad.index)
    trial.start_driver()
    trial.driver_exit()
    if f"retraining phase {bad.name}" not in trial.output():
        raise AssertionError(f"no line says phase {bad.name} is retrained")


def first_drawn_shard(trial: Trial, phase: Phase) -> str:
    """The shard rank 0 of `phase` draws first, so that the flipped byte is met for sure."""
    manifest = read_manifest(trial.spec.dataset, trial.spec.storage_options)
    _, shard = next(_draw_shards(trial.spec.dataset, manifest.shards[phase.resolution],
                                 stream_seed(trial.spec, phase, 0), 0))
    return f"{trial.spec.dataset.removeprefix('s3://')}/{shard.name}"


def fault_shard(trial: Trial, dataset_fs, rng: random.Random) -> None:
    shard_path = first_drawn_shard(trial, trial.phases[rng.randrange(1, len(trial.phases))])
    original = dataset_fs.cat_file(shard_path)
    flip_byte(dataset_fs, shard_path, rng)
    try:
        trial.mark_fault()
        trial.start_driver()
        trial.expected["progan_corrupt_samples_total"] = -1  # each draw of the shard counts all its samples
        trial.driver_exit()
    finally:
        dataset_fs.pipe_file(shard_path, original)


# The checker ------------------------------------------------------------------------------------------------------


def group_starts(output: str, phase: Phase) -> list[int]:
    return [int(m) for m in re.findall(rf"phase {re.escape(phase.name)}: \d+ worker\(s\) start at (\d+)/", output)]


def violations(trial: Trial) -> list[str]:
    """Every invariant the trial broke, in words; empty when all held."""
    found = []
    state = trial.store.read_state()
    if state.status is not Status.FINISHED:
        return [f"run ended {state.status.value}: {state.reason}"]
    trial.watch_commits()
    for phase in trial.phases:
        record = trial.store.fs.cat_file(trial.store.layout.committed_marker(phase))
        if phase.index not in trial.recommitted and trial.commits.get(phase.index) != record:
            found.append(f"phase {phase.name}: its commit changed after it was first seen")
        try:
            data = trial.store.read_checkpoint(phase, trial.spec)
            payload = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to verify or load is the violation reported
            found.append(f"phase {phase.name}: commit does not verify or load: {e}")
            continue
        if payload["phase_images"] != phase.images:
            found.append(f"phase {phase.name}: trained {payload['phase_images']} images, planned {phase.images}")
    if [r.index for r in state.committed] != [p.index for p in trial.phases]:
        found.append(f"state.json commits {[r.index for r in state.committed]}")
    redone = images_redone(trial)
    interval = max(trial.phases[0].batch, int(trial.spec.checkpoint_kimg * 1000))
    batch = max(p.batch for p in trial.phases)
    if redone > interval + batch:
        found.append(f"{redone} images redone, more than the checkpoint interval {interval} + one batch {batch}")
    for counter, want in trial.expected.items():
        got = trial.scrapes.value(counter)
        if want is not None and ((want < 0 and got < 1) or (want >= 0 and got != want)):
            found.append(f"final scrape {counter} = {got:g}, expected {'>= 1' if want < 0 else f'{want:g}'}")
    # one driver's counter against the run's count (a second driver's counter starts again from 0)
    restarts = trial.scrapes.value("progan_worker_group_restarts_total")
    if len(trial.outputs) == 1 and restarts != state.restarts:
        found.append(f"final scrape progan_worker_group_restarts_total = {restarts:g}, state.json {state.restarts}")
    for counter in ("progan_worker_group_restarts_total", "progan_rollbacks_total", "progan_corrupt_samples_total"):
        if counter not in trial.expected and trial.scrapes.value(counter):
            found.append(f"final scrape {counter} = {trial.scrapes.value(counter):g} with no such fault injected")
    return found


def images_redone(trial: Trial) -> int:
    """Images trained again after the fault: the phase's progress last reported before it, less where the first
    group of that phase that started after the fault (a restart, or the rerun driver's) began; 0 when none started
    again, or when the restart began past that report (the group had gone on to a later checkpoint before the fault,
    and reports come only every 2 s). A phase whose commit was rejected, and the phase trained after it, start over
    by design: that is the recovery itself, not images lost, and counts 0 here."""
    index, images = trial.images_at_fault
    if index < 0 or index >= len(trial.phases) or (trial.recommitted and index >= min(trial.recommitted)):
        return 0
    restarts = group_starts(trial.output(), trial.phases[index])[1:]
    return max(0, images - min(restarts)) if restarts else 0


def recovery_seconds(trial: Trial) -> float:
    """From the fault to the first report past the progress reported just before it: the time the fault cost,
    up to the report interval (2 s)."""
    return trial.recovered_at - trial.fault_at if trial.recovered_at else 0.0


# The campaign -------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", default="small", help="small (1 of each), full (the campaign), or a number each")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of: {', '.join(KINDS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--s3-outage", type=float, nargs=2, default=(5.0, 30.0), metavar=("MIN", "MAX"),
                        help="seconds the S3 server stays stopped in an s3 trial, drawn from [MIN, MAX]")
    parser.add_argument("--logs", type=Path, default=Path("chaos-logs"), help="driver logs of every trial")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"--kinds: unknown {', '.join(sorted(unknown))}")
    counts = {k: (1 if args.trials == "small" else FULL[k] if args.trials == "full" else int(args.trials)) for k in kinds}
    rng = random.Random(args.seed)
    args.logs.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    rows = {k: {"trials": 0, "finished": 0, "held": 0, "redone": 0, "recovery": 0.0} for k in kinds}

    with running_s3_server() as s3, running_ray_cluster([("node-a", NODE_CPUS), ("node-b", NODE_CPUS)],
                                                       extra_env=s3.env()) as cluster:
        bucket = s3.new_bucket()
        dataset = f"s3://{bucket}/data"
        subprocess.run([PROGAN, "prepare", "builtin", dataset, "--resolution", "8", "--limit", "4000",
                        "--shard-size", "16"], check=True, env=run_env(s3.env()), capture_output=True)
        env = run_env(s3.env(), cluster.env(), {"RAY_ADDRESS": cluster.address})
        plan = [(k, n) for k in kinds for n in range(counts[k])]
        rng.shuffle(plan)
        for kind, n in plan:
            port = free_port()
            spec = chaos_spec(f"{kind}-{n}", dataset, f"s3://{bucket}/runs", port)
            spec_path = args.logs / f"{kind}-{n}.yaml"
            spec_path.write_text(yaml.safe_dump(spec))
            parsed = parse_spec(spec_path.read_text())
            trial = Trial(kind, n, spec_path, parsed, RunStore(parsed.run_url, parsed.storage_options), env,
                          args.logs, Scrapes(f"http://127.0.0.1:{port}/metrics").start())
            error = ""
            try:
                {"worker": lambda: fault_worker(trial, cluster, rng), "driver": lambda: fault_driver(trial, cluster, rng),
                 "node": lambda: fault_node(trial, cluster, rng), "s3": lambda: fault_s3(trial, s3, rng, args.s3_outage),
                 "nan": lambda: fault_nan(trial, rng), "checkpoint": lambda: fault_checkpoint(trial, rng),
                 "shard": lambda: fault_shard(trial, s3.filesystem(), rng)}[kind]()
                if trial.driver.returncode != 0 and kind == "s3":  # past the retry budget: the same command resumes
                    trial.start_driver()
                    trial.driver_exit()
                time.sleep(2 * SCRAPE_SECONDS)
                broken = violations(trial)
            except Exception as e:  # noqa: BLE001 - a trial that breaks the harness is reported, not fatal
                broken, error = [f"{type(e).__name__}: {e}"], "harness"
            finally:
                trial.scrapes.stop.set()
                if trial.driver is not None and trial.driver.poll() is None:
                    trial.driver.kill()
                    trial.driver.wait()
            row = rows[kind]
            row["trials"] += 1
            row["finished"] += trial.store.read_state().status is Status.FINISHED if not error else 0
            row["held"] += not broken
            row["redone"] = max(row["redone"], images_redone(trial))
            row["recovery"] = max(row["recovery"], recovery_seconds(trial))
            verdict = "held" if not broken else "; ".join(broken)
            print(f"{kind:>10} #{n:<2} {verdict}", flush=True)

    print(f"\nchaos campaign: {sum(counts.values())} trials in {(time.monotonic() - began) / 60:.1f} min, seed {args.seed}")
    print(f"{'fault':>12} | {'trials':>6} | {'finished':>8} | {'invariants held':>15} | {'max images redone':>17} | "
          f"{'max recovery s':>14}")
    for kind, r in rows.items():
        print(f"{kind:>12} | {r['trials']:>6} | {r['finished']:>8} | {r['held']:>15} | {r['redone']:>17} | "
              f"{r['recovery']:>14.1f}")


if __name__ == "__main__":
    main()
