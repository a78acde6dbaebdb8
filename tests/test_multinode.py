"""A real multi-node Ray cluster on this machine: a head without training capacity and two worker nodes, each its
own `ray start` (tests/conftest.py: running_ray_cluster). Ranks spread over nodes, a node lost mid-phase (a fixed
group waits for it and resumes; an elastic group shrinks at the same global batch and grows back), and a worker
killed while its group starts, counted as a restart like any other."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from service.runstore import RunStore
from service.schedule import Status, build_schedule
from service.spec import parse_spec
from tests.conftest import (
    PROGAN,
    builtin_dataset,
    ray_train_workers,
    run_env,
    running_ray_cluster,
    scrape,
    tiny_spec,
    train_checkpoints,
    wait_for,
)

pytestmark = pytest.mark.slow
NODES = [("node-a", 2), ("node-b", 2)]


@pytest.fixture(scope="module")
def cluster():
    with running_ray_cluster(NODES) as c:
        yield c


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return builtin_dataset(tmp_path_factory.mktemp("data") / "builtin8", 256, 64)


def spec_for(tmp_path: Path, dataset: str, run: str, **overrides) -> Path:
    return tiny_spec(tmp_path, dataset, str(tmp_path / "runs"), run, resolution=8, data_workers=0, **overrides)


def start_train(spec: Path, cluster, log: Path) -> subprocess.Popen:
    return subprocess.Popen([PROGAN, "train", str(spec), "--address", cluster.address], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=run_env(cluster.env()))


def starts(output: str, phase: str) -> list[tuple[int, int]]:
    """(workers, images) of each 'phase P: N worker(s) start at I/…' line."""
    return [(int(m[1]), int(m[2])) for m in re.finditer(rf"phase {phase}: (\d+) worker\(s\) start at (\d+)/", output)]


def test_spread_ranks_over_nodes_and_a_worker_killed_while_its_group_starts(tmp_path, dataset, cluster):
    """Each node has room for both ranks (pack would put them together); spread puts one on each, in every phase.
    The first worker process is SIGKILLed as soon as it exists, before its first `worker_started` (in the group's
    bring-up, or while it imports and loads): Ray Train retries the group, and that retry shows in state.json, the
    restarts metric and one console line like any other."""
    spec_path = spec_for(tmp_path, dataset, "spread", placement="spread", stable_kimg=0.016, fade_kimg=0.016,
                         metrics_linger_seconds=3)
    spec = parse_spec(spec_path.read_text())
    store = RunStore(spec.run_url)
    log = tmp_path / "driver.log"
    driver = start_train(spec_path, cluster, log)
    try:
        victim = wait_for(lambda: ray_train_workers(cluster.token), 300, "a Ray Train worker process", driver)[0]
        os.kill(victim.pid, signal.SIGKILL)
        assert " start at " not in log.read_text()
        metrics = re.search(r"metrics: (\S+)", log.read_text())[1]
        wait_for(lambda: re.search(r'progan_worker_group_restarts_total\{run="spread"\} 1\.0', scrape(metrics) or ""),
                 120, "the restart in the metrics", driver)
        assert driver.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    output = log.read_text()
    first = build_schedule(spec)[0]
    assert starts(output, first.name) == [(2, 0)], output[-3000:]  # the killed group never trained
    assert output.count(f"phase {first.name}: Ray Train restarted the worker group") == 1, output[-3000:]
    state = store.read_state()
    assert state.status is Status.FINISHED and len(state.committed) == 3 and state.restarts == 1, output[-3000:]
    nodes = {cluster.nodes[name].node_id for name, _ in NODES}
    for record in state.committed:
        assert [len(g["nodes"]) for g in record.groups] == [2], record
        assert set(record.groups[0]["nodes"]) == nodes, (record, nodes)


def test_lost_node_fixed_group_waits_and_resumes_elastic_group_shrinks_and_grows_back(tmp_path, dataset, cluster):
    """One run: phase 0 has a fixed group of 2 (one worker per node), phase 1 an elastic [1, 2]. Node b's raylet
    is SIGKILLed in phase 0, then in phase 1 all of node b at once (a host crash), and node b is started again after
    each loss; once phase 1's group is back to 2, both nodes go, and `progan stop` ends the waiting run."""
    spec_path = spec_for(tmp_path, dataset, "nodeloss", workers={4: 2, 8: [1, 2]}, cpus_per_worker=2,
                         stable_kimg={4: 0.4, 8: 0.016}, fade_kimg=40.0, checkpoint_kimg=0.064)
    spec = parse_spec(spec_path.read_text())
    store = RunStore(spec.run_url)
    phases = build_schedule(spec)
    log = tmp_path / "driver.log"

    def sizes(phase) -> list[int]:
        return [w for w, _ in starts(log.read_text(), phase.name)]

    driver = start_train(spec_path, cluster, log)
    try:
        # Fixed: the group waits for capacity, says so, and resumes from its checkpoint once the node is back.
        wait_for(lambda: len(train_checkpoints(store, phases[0].name)) >= 2, 300, "checkpoints in phase 0", driver)
        os.kill(cluster.nodes["node-b"].raylet_pid, signal.SIGKILL)  # the raylet crashes; its workers go with it
        wait_for(lambda: "waiting for 2 workers" in log.read_text(), 120, "the wait for workers", driver)
        metrics = re.search(r"metrics: (\S+)", log.read_text())[1]
        wait_for(lambda: re.search(r'progan_waiting_for_workers\{run="nodeloss"\} 2\.0', scrape(metrics) or ""), 30,
                 "progan_waiting_for_workers 2", driver)
        cluster.add_node("node-b", 2)
        wait_for(lambda: store.is_committed(phases[0]), 300, "phase 0 committed", driver)

        # Elastic: the group goes on with the survivor at the same global batch, and grows back to 2.
        wait_for(lambda: len(train_checkpoints(store, phases[1].name)) >= 2 and sizes(phases[1])[-1:] == [2], 300,
                 "checkpoints of a group of 2 in phase 1", driver)
        before = len(sizes(phases[1]))
        cluster.nodes["node-b"].kill()
        wait_for(lambda: 1 in sizes(phases[1])[before:], 240, "the group of 1", driver)
        wait_for(lambda: re.search(r'progan_workers\{run="nodeloss"\} 1\.0', scrape(metrics) or ""), 30,
                 "progan_workers 1", driver)
        cluster.add_node("node-b", 2)
        wait_for(lambda: sizes(phases[1])[-1] == 2 and 1 in sizes(phases[1])[before:], 240, "the group of 2 again",
                 driver)

        # Every node gone: not even the elastic minimum has room. A stop then ends the run at once (no worker is
        # there to take it), at the phase's latest checkpoint.
        cluster.nodes["node-a"].kill()
        cluster.nodes["node-b"].kill()
        wait_for(lambda: "waiting for 1 workers" in log.read_text(), 120, "the wait for 1 worker", driver)
        subprocess.run([PROGAN, "stop", spec.run_url], check=True, capture_output=True)
        assert driver.wait(timeout=60) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    output = log.read_text()
    state = store.read_state()
    assert (state.status, state.phase) == (Status.STOPPED, 1), output[-3000:]
    assert f"stopped in phase {phases[1].name} while it waited for workers" in output, output[-3000:]

    fixed = starts(output, phases[0].name)
    assert fixed[0] == (2, 0) and all(w == 2 for w, _ in fixed) and fixed[-1][1] > 0, output[-3000:]
    record = state.committed[0]
    assert len(record.groups) >= 2 and all(len(g["nodes"]) == 2 for g in record.groups), record
    # The resumed group has one rank on the node that joined after the loss (a rejoined node gets a new id).
    assert len(set(record.groups[-1]["nodes"]) - set(record.groups[0]["nodes"])) == 1, record
    payload = torch.load(io.BytesIO(store.read_checkpoint(phases[0], spec)), weights_only=True)
    assert payload["total_images"] == phases[0].images  # exactly the phase's images, resumed or not

    elastic = starts(output, phases[1].name)
    assert all(images % phases[1].batch == 0 for _, images in elastic)  # global batches, whatever the group size
    assert [images for _, images in elastic] == sorted(images for _, images in elastic), elastic
    # Both losses and the grow-back are restarts, in state.json and on the console.
    assert state.restarts >= 3, output[-3000:]
    assert output.count("Ray Train restarted the worker group") >= 3, output[-3000:]


