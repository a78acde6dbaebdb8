"""The coordinator end to end: real Ray cluster (token auth), real DDP over gloo, real S3 run store."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from service.runstore import RunStore
from service.schedule import Status, build_schedule
from service.spec import parse_spec
from tests.conftest import (
    PROGAN,
    TRAINED_SWD_IMAGES,
    run_env,
    tiny_spec,
    train_checkpoints,
    wait_for,
)

pytestmark = pytest.mark.slow


def train(spec: Path, cluster, s3_server, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PROGAN, "train", str(spec), "--address", cluster.address, *extra], capture_output=True,
                          text=True, timeout=timeout, env=run_env(s3_server.env(), cluster.env()))


def start_train(spec: Path, cluster, s3_server, log: Path) -> subprocess.Popen:
    return subprocess.Popen([PROGAN, "train", str(spec), "--address", cluster.address], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=run_env(s3_server.env(), cluster.env()))


def test_run_4_to_16_on_s3_commits_every_phase(tmp_path, s3_server, s3_dataset, trained_run, ray_cluster):
    spec_path, stdout = trained_run.spec_path, trained_run.stdout
    assert "FINISHED" in stdout
    # The next phase's workers were brought up while a phase was finishing (they wait for its commit).
    assert "is nearly done: bringing up" in stdout, stdout[-3000:]

    spec = parse_spec(spec_path.read_text())
    store = RunStore(spec.run_url)
    state = store.read_state()
    phases = build_schedule(spec)
    assert state.status is Status.FINISHED and len(phases) == 5
    assert [r.index for r in state.committed] == [0, 1, 2, 3, 4]
    for before, record in zip((None, *state.committed), state.committed):  # the step times the switch is timed by
        assert 0 < record.first_step_started_at <= record.first_step_at <= record.last_step_at < record.committed_at
        assert before is None or before.last_step_at < record.first_step_started_at
    for phase in phases:  # evaluations run beside the next phase, but a FINISHED run has all of them
        assert store.is_committed(phase)
        assert store.fs.cat_file(store.layout.samples(phase))[:8] == b"\x89PNG\r\n\x1a\n"
        has_eval = store.fs.exists(store.layout.evaluation(phase))
        assert has_eval == (phase.resolution == 16), phase.name
        if has_eval:
            evaluation = json.loads(store.fs.cat_file(store.layout.evaluation(phase)))
            assert evaluation["images"] == TRAINED_SWD_IMAGES and evaluation["swd"]["avg"] > 0
            assert f"phase {phase.name}: SWD {evaluation['swd']['avg']:.2f}" in stdout
    payload = torch.load(__import__("io").BytesIO(store.read_checkpoint(phases[-1], spec)), weights_only=True)
    assert payload["resolution"] == 16 and payload["phase"] == 4
    assert payload["total_images"] == sum(p.images for p in phases)

    status = subprocess.run([PROGAN, "status", spec.run_url, "--json"], capture_output=True, text=True,
                            env=run_env(s3_server.env()))
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["state"] == "FINISHED" and all(p["status"] == "committed" for p in report["phases"])

    again = train(spec_path, ray_cluster, s3_server)
    assert again.returncode == 0 and "already FINISHED" in again.stdout  # finished phases never train again

    changed = tiny_spec(tmp_path, s3_dataset, spec.storage, spec.run, latent_size=32, fmap_max=32)
    refused = train(changed, ray_cluster, s3_server)
    assert refused.returncode == 2
    assert "latent_size: 16 -> 32" in refused.stderr and "fmap_max: 16 -> 32" in refused.stderr


def test_killed_driver_continues_at_its_phase(tmp_path, s3_server, s3_bucket, s3_dataset, ray_cluster):
    spec_path = tiny_spec(tmp_path, s3_dataset, f"s3://{s3_bucket}/runs", "killdriver", resolution=8,
                          stable_kimg={4: 0.032, 8: 0.8}, fade_kimg=0.032, checkpoint_kimg=0.128)
    spec = parse_spec(spec_path.read_text())
    store = RunStore(spec.run_url)
    last = build_schedule(spec)[-1]
    log = tmp_path / "driver1.log"
    driver = start_train(spec_path, ray_cluster, s3_server, log)
    try:
        wait_for(lambda: train_checkpoints(store, last.name), 300, "a checkpoint inside the last phase", driver)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert store.read_state().status is Status.RUNNING  # the killed driver could not say anything
    assert store.read_state().phase == last.index
    first = build_schedule(spec)[0]
    store.fs.rm(store.layout.samples(first))  # as a driver killed while that phase's evaluation was in flight

    again = train(spec_path, ray_cluster, s3_server)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resuming {spec.run_url}: RUNNING, phase {last.name}" in again.stdout
    missing = f"phase {first.name}: its sample grid or eval.json is missing, evaluating it again"
    assert missing in again.stdout
    # committed phases are never trained again
    assert not [line for line in again.stdout.splitlines() if "phase 00-0004-stable:" in line and missing not in line]
    assert store.fs.cat_file(store.layout.samples(first))[:8] == b"\x89PNG\r\n\x1a\n"
    starts = [int(line.split(" start at ")[1].split("/")[0]) for line in again.stdout.splitlines()
              if f"phase {last.name}:" in line and " start at " in line]
    assert starts and starts[0] > 0
    assert store.read_state().status is Status.FINISHED


def test_bad_inputs_fail_before_training(tmp_path, s3_server, s3_dataset, ray_cluster):
    env = run_env(s3_server.env(), ray_cluster.env())
    spec = tiny_spec(tmp_path, s3_dataset, str(tmp_path / "runs"), "bad")
    r = subprocess.run([PROGAN, "train", str(spec), "--address", "127.0.0.1:1"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in r.stderr

    missing = tiny_spec(tmp_path, str(tmp_path / "nodata"), str(tmp_path / "runs"), "bad")
    r = subprocess.run([PROGAN, "train", str(missing), "--address", ray_cluster.address], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "dataset.json" in r.stderr

    (tmp_path / "file").write_text("x")
    unwritable = tiny_spec(tmp_path, s3_dataset, str(tmp_path / "file" / "runs"), "bad")
    r = subprocess.run([PROGAN, "train", str(unwritable), "--address", ray_cluster.address], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "is not writable" in r.stderr

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = tiny_spec(tmp_path, s3_dataset, str(tmp_path / "runs"), "taken", metrics_port=port)
        r = subprocess.run([PROGAN, "train", str(taken), "--address", ray_cluster.address], capture_output=True,
                           text=True, env=env)
    assert r.returncode == 2 and f"metrics port {port} on the head node is not available" in r.stderr, r.stderr

    wrong_res = tiny_spec(tmp_path, s3_dataset, str(tmp_path / "runs"), "bad", resolution=32)
    r = subprocess.run([PROGAN, "train", str(wrong_res), "--address", ray_cluster.address], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 2 and "32" in r.stderr
    assert not (tmp_path / "runs" / "bad").exists()  # nothing written


def test_progan_stop_ends_the_run_stopped_after_a_last_checkpoint(tmp_path, s3_server, s3_bucket, s3_dataset,
                                                                  ray_cluster):
    spec_path = tiny_spec(tmp_path, s3_dataset, f"s3://{s3_bucket}/runs", "stopme", resolution=8,
                          stable_kimg={4: 4.0, 8: 0.016}, fade_kimg=0.016, checkpoint_kimg=10)
    spec = parse_spec(spec_path.read_text())
    store = RunStore(spec.run_url)
    log = tmp_path / "driver.log"
    driver = start_train(spec_path, ray_cluster, s3_server, log)
    try:
        wait_for(lambda: "worker(s) start at 0/" in log.read_text(), 120, "the first phase to start", driver)
        stop = subprocess.run([PROGAN, "stop", spec.run_url], capture_output=True, text=True,
                              env=run_env(s3_server.env()))
        assert stop.returncode == 0, stop.stderr
        assert driver.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    state = store.read_state()
    assert (state.status, state.phase) == (Status.STOPPED, 0)
    assert train_checkpoints(store, build_schedule(spec)[0].name)  # the last checkpoint, though none was due
    assert not store.stop_requested()
