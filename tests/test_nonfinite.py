"""Non-finite steps end to end (real Ray, 2 workers): the PROGAN_FAULT_NONFINITE hook puts NaN into rank 0's reals;
every rank skips those steps, a streak of nonfinite_rollback_steps rolls the phase back to its last good checkpoint
with a fresh seed, and one rollback more than max_rollbacks fails the run with a one-line reason. The counts reach
the console, the metrics and state.json. The same `progan train` then resumes, and a torn in-phase Ray Train
checkpoint in between falls back to the one before it."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from service.runstore import RunStore
from service.schedule import Status, build_schedule
from service.spec import parse_spec
from tests.conftest import PROGAN, run_env, scrape, tiny_spec, wait_for

pytestmark = pytest.mark.slow


def test_a_bad_fault_hook_is_refused_before_anything_is_written(tmp_path, local_dataset):
    spec = tiny_spec(tmp_path, local_dataset, str(tmp_path / "runs"), "badhook", resolution=8)
    result = subprocess.run([PROGAN, "train", str(spec)], capture_output=True, text=True,
                            env=run_env({"PROGAN_FAULT_NONFINITE": "phase=1,step=three"}))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "PROGAN_FAULT_NONFINITE='phase=1,step=three': step must be a whole number" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_nonfinite_steps_roll_back_then_fail_and_the_run_resumes(tmp_path, s3_server, ray_cluster, local_dataset):
    # Phase 1 (8² fade) is 8 steps of 8 images with a checkpoint interval of 2 steps, so a checkpoint every step
    # (every half interval). Steps 3 and 4 are poisoned on two passes: the first streak rolls back to 24 images
    # (the checkpoint at 32 came after a non-finite step, so it is not a good one to return to); the second is one
    # rollback more than max_rollbacks = 1.
    spec_path = tiny_spec(tmp_path, local_dataset, str(tmp_path / "runs"), "nan", resolution=8,
                          stable_kimg={4: 0.016, 8: 0.016}, fade_kimg=0.064, checkpoint_kimg=0.016,
                          nonfinite_rollback_steps=2, max_rollbacks=1, metrics_linger_seconds=3)
    spec = parse_spec(spec_path.read_text())
    store = RunStore(str(tmp_path / "runs" / "nan"))
    phases = build_schedule(spec)
    fade = phases[1]

    log = tmp_path / "first.log"
    env = run_env(s3_server.env(), ray_cluster.env(), {"PROGAN_FAULT_NONFINITE": "phase=1,step=3,count=2,passes=2"})
    driver = subprocess.Popen([PROGAN, "train", str(spec_path), "--address", ray_cluster.address],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    try:
        url = wait_for(lambda: Path(store.layout.driver).exists() and store.read_driver().get("metrics"), 300,
                       "the metrics endpoint", driver)
        last = None
        while driver.poll() is None:
            last = scrape(url) or last
            time.sleep(0.2)  # the endpoint lingers metrics_linger_seconds after the run ends
        output = log.read_text()
        assert driver.returncode == 1, output[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()

    rolled = [line for line in output.splitlines() if "non-finite steps in a row" in line and "rolled back" in line]
    assert len(rolled) == 1, output[-4000:]
    assert (f"phase {fade.name}: 2 non-finite steps in a row at 40 images: rolled back to 24 images with a fresh "
            f"seed (rollback 1 of at most 1)") in rolled[0]
    reason = (f"phase {fade.name}: 2 non-finite steps in a row at 40 images after 1 rollback(s), more than "
              f"max_rollbacks = 1")
    state = store.read_state()
    assert state.status is Status.FAILED and state.reason == reason, state
    assert state.phase == fade.index and [r.index for r in state.committed] == [0]
    assert (state.nonfinite_steps, state.rollbacks) == (4, 1)
    assert f"{store.url}: FAILED: {reason}\n" in output
    assert re.search(r'^progan_nonfinite_steps_total\{run="nan"\} 4\.0$', last, re.M), last
    assert re.search(r'^progan_rollbacks_total\{run="nan"\} 1\.0$', last, re.M), last
    assert re.search(r'^progan_run_state\{run="nan",state="failed"\} 1\.0$', last, re.M), last

    # Between the invocations, the phase's latest Ray Train checkpoint is torn (truncated).
    checkpoints = sorted(c for c in Path(store.layout.train_dir(fade)).glob("checkpoint_*") if c.is_dir())
    assert len(checkpoints) == 2 and all((c / "checkpoint.sha256").exists() for c in checkpoints)
    torn = checkpoints[-1] / "checkpoint.pt"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])

    again = subprocess.run([PROGAN, "train", str(spec_path), "--address", ray_cluster.address], capture_output=True,
                           text=True, timeout=600, env=run_env(s3_server.env(), ray_cluster.env()))
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-4000:]
    said = [line for line in again.stdout.splitlines() if "torn or corrupt" in line]
    assert len(said) == 1 and said[0].endswith("resuming from the checkpoint before it"), output[-4000:]
    assert f"phase {fade.name}: 2 worker(s) start at 32/{fade.images} images" in again.stdout
    assert "rolled back" not in output
    state = store.read_state()
    assert state.status is Status.FINISHED and [r.index for r in state.committed] == [p.index for p in phases]
    assert (state.nonfinite_steps, state.rollbacks) == (4, 1)
    for p in phases:
        store.read_checkpoint(p, spec)
