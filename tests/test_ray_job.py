"""`ray job submit` against a real `ray start --head` cluster with token authentication, S3 run store."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from service.runstore import RunStore
from service.schedule import Status, build_schedule
from service.spec import parse_spec
from tests.conftest import run_env, tiny_spec, train_checkpoints, wait_for

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")


def ray_job(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    command, *rest = args
    result = subprocess.run([RAY, "job", command, "--address", cluster.dashboard, *rest], capture_output=True, text=True,
                            env=run_env(cluster.env()), timeout=120)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def submit(cluster, workdir: Path, spec: Path) -> str:
    job = f"progan-{uuid.uuid4().hex[:8]}"
    ray_job(cluster, "submit", "--submission-id", job, "--working-dir", str(workdir), "--no-wait",
            "--runtime-env-json", json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}}),
            "--", "python", "-m", "service.train", spec.name)
    return job


def job_status(cluster, job: str) -> str:
    """The job's JobStatus name, from the Jobs API that `ray job status` reads (without a CLI process a poll, whose
    start-up would take the CPU the job trains on)."""
    request = urllib.request.Request(f"{cluster.dashboard}/api/jobs/{job}",
                                     headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["status"]


def wait_job(cluster, job: str, timeout: float = 400) -> str:
    return wait_for(lambda: (s := job_status(cluster, job)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
                    timeout, f"job {job} to end")


@pytest.fixture(scope="module")
def job_dataset(s3_server) -> str:
    url = f"s3://{s3_server.new_bucket()}/builtin8"
    subprocess.run([sys.executable, "-m", "service.cli", "prepare", "builtin", url, "--resolution", "8",
                    "--limit", "128", "--shard-size", "64"], check=True, capture_output=True, env=run_env(s3_server.env()))
    return url


def test_submit_stop_and_resubmit(tmp_path, s3_server, s3_bucket, job_dataset, ray_cluster):
    spec_path = tiny_spec(tmp_path, job_dataset, f"s3://{s3_bucket}/runs", "job", resolution=8,
                          stable_kimg={4: 0.032, 8: 0.064}, fade_kimg=0.8, checkpoint_kimg=0.128)
    spec = parse_spec(spec_path.read_text())
    store = RunStore(spec.run_url)
    fade = build_schedule(spec)[1]
    job = submit(ray_cluster, tmp_path, spec_path)
    wait_for(lambda: train_checkpoints(store, fade.name), 300, "a checkpoint inside the fade phase")
    ray_job(ray_cluster, "stop", job)
    assert wait_job(ray_cluster, job) == "STOPPED"
    state = store.read_state()
    assert (state.status, state.phase) == (Status.STOPPED, fade.index), ray_job(ray_cluster, "logs", job).stdout[-3000:]
    assert "stopped in phase 01-0008-fade" in ray_job(ray_cluster, "logs", job).stdout

    job = submit(ray_cluster, tmp_path, spec_path)
    assert wait_job(ray_cluster, job) == "SUCCEEDED", ray_job(ray_cluster, "logs", job).stdout[-3000:]
    logs = ray_job(ray_cluster, "logs", job).stdout
    assert "resuming" in logs and "phase 00-0004-stable:" not in logs
    state = store.read_state()
    assert state.status is Status.FINISHED
    assert all(store.is_committed(p) for p in build_schedule(spec))


def test_bad_spec_fails_the_job_with_the_error_in_its_logs(tmp_path, ray_cluster):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: bad\ndataset: d\nstorage: s\nresolution: 12\n")
    job = submit(ray_cluster, tmp_path, bad)
    assert wait_job(ray_cluster, job, timeout=120) == "FAILED"
    logs = ray_job(ray_cluster, "logs", job).stdout
    assert "resolution: must be a power of two from 8 to 1024, got 12" in logs


def test_jobs_api_refuses_a_client_without_the_token(ray_cluster):
    result = subprocess.run([RAY, "job", "list", "--address", ray_cluster.dashboard], capture_output=True, text=True,
                            env=run_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}), timeout=60)
    assert result.returncode != 0
