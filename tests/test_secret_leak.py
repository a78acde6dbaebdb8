"""No secret leaves the environment it was given in: a tiny training submitted through the Jobs API of a real
token-authenticated Ray cluster, on the real S3 run store, with recognisable credentials and token; then every
file in the run store, every file Ray wrote under its temp dir, the metrics scrapes, `progan status --json`,
the `ray job` metadata and logs, and the rendered manifests are searched for them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

import psutil
import pytest

from service.k8s import render_rayjob
from service.runstore import RunStore
from service.schedule import Status
from service.spec import parse_spec
from tests.conftest import (
    RAY_STOP_GRACE_SECONDS,
    ROOT,
    RayCluster,
    free_port,
    run_env,
    scrape,
    stop_process_group,
    tiny_spec,
    wait_for_port,
)
from tests.test_ray_job import job_status, ray_job, submit

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
# A token no other process would write by chance: if any file holds it, the token leaked.
TOKEN = f"LEAKCANARYRAYTOKEN{uuid.uuid4().hex}"


@pytest.fixture
def canary_cluster(s3_server):
    """`ray start --head` with the canary token and the S3 credentials in its environment, as a cluster's nodes
    get them, and a temp dir of its own so that every file Ray writes for it can be searched."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port, dashboard = free_port(), free_port()
    env = run_env(s3_server.env(), {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "RAY_USAGE_STATS_ENABLED": "0",
                                    "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}",
                                    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT)})
    args = [
        str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
        "--num-cpus=2", f"--temp-dir={temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats",
    ]  # fmt: skip
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for_port(dashboard, proc, 120, "ray start --head (dashboard)")
            yield RayCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", TOKEN), temp_dir
        finally:
            stop_process_group(proc, grace=RAY_STOP_GRACE_SECONDS)
            shutil.rmtree(temp_dir, ignore_errors=True)


def test_no_secret_in_anything_a_run_writes_or_serves(tmp_path, s3_server, canary_cluster, kubectl):
    cluster, temp_dir = canary_cluster
    secrets = {"AWS_ACCESS_KEY_ID": s3_server.key, "AWS_SECRET_ACCESS_KEY": s3_server.secret, "RAY_AUTH_TOKEN": TOKEN}
    assert all(len(v) >= 15 for v in secrets.values())  # long enough that a match is no coincidence

    bucket = s3_server.new_bucket()
    dataset = f"s3://{bucket}/builtin8"
    subprocess.run([str(BIN / "progan"), "prepare", "builtin", dataset, "--resolution", "8", "--limit", "64",
                    "--shard-size", "32"], check=True, capture_output=True, env=run_env(s3_server.env()))
    spec_path = tiny_spec(tmp_path, dataset, f"s3://{bucket}/runs", "leak", resolution=8, workers=2,
                          fade_kimg=0.032, stable_kimg=0.032, checkpoint_kimg=0.032, metrics_linger_seconds=3,
                          storage_options={"endpoint_url": s3_server.endpoint},
                          eval={"swd_images": 32, "sample_grid": 2})
    spec = parse_spec(spec_path.read_text())
    store = RunStore(spec.run_url, spec.storage_options)

    job = submit(cluster, tmp_path, spec_path)  # through the Jobs API, which keeps the job's details

    served: dict[str, str] = {}  # what the run serves and `progan status` prints while it runs
    status_env = run_env(s3_server.env())
    bound: set[str] = set()
    deadline = time.monotonic() + 600
    while (status := job_status(cluster, job)) != "SUCCEEDED":
        assert status not in ("FAILED", "STOPPED") and time.monotonic() < deadline, \
            ray_job(cluster, "logs", job).stdout[-3000:]
        metrics = store.read_driver().get("metrics") if store.exists() else None
        if metrics and (text := scrape(metrics)):
            served[f"scrape {len(served)}"] = text
            port = urllib.parse.urlsplit(metrics).port
            bound |= {c.laddr.ip for c in psutil.net_connections("inet")
                      if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
            if sum(k.startswith("status") for k in served) < 3:  # each is a process of its own, taking CPU from the run
                report = subprocess.run([str(BIN / "progan"), "status", spec.run_url, "--json"], capture_output=True,
                                        text=True, env=status_env, timeout=60)
                served[f"status {len(served)}"] = report.stdout + report.stderr
        time.sleep(1)
    report = subprocess.run([str(BIN / "progan"), "status", spec.run_url, "--json"], capture_output=True, text=True,
                            env=status_env, timeout=60)
    assert json.loads(report.stdout)["state"] == "FINISHED"
    served["status at the end"] = report.stdout + report.stderr
    assert any(k.startswith("scrape") and "progan_fade_alpha" in v for k, v in served.items()), "never scraped"
    assert bound == {"127.0.0.1"}  # the spec's default metrics_host, through the run actor on the cluster
    assert store.read_state().status is Status.FINISHED

    # A control: a value handed to a job the way a secret must never be, in its runtime env. The same search
    # has to find it, in the Jobs API's metadata at least.
    control = f"LEAKCONTROL{uuid.uuid4().hex}"
    ray_job(cluster, "submit", "--submission-id", f"control-{uuid.uuid4().hex[:8]}",
            "--runtime-env-json", json.dumps({"env_vars": {"PROGAN_CONTROL": control}}),
            "--", "python", "-c", "import os; print(len(os.environ['PROGAN_CONTROL']))")

    # the Jobs API's view of the jobs: their details (entrypoint, runtime env, metadata), the list, the logs
    served["ray job list"] = ray_job(cluster, "list").stdout
    served["ray job status"] = ray_job(cluster, "status", job, "--verbose").stdout
    served["ray job logs"] = ray_job(cluster, "logs", job).stdout

    # the manifests of the same spec, rendered and kustomized
    k8s_spec = tmp_path / "k8s" / spec_path.name  # Kubernetes needs a fixed metrics port
    k8s_spec.parent.mkdir()
    k8s_spec.write_text(spec_path.read_text().replace("metrics_port: 0", "metrics_port: 9400"))
    served["k8s render"] = render_rayjob(k8s_spec, "progan-service:0.1.0", gpus_per_node=8)
    for overlay in ("overlays/cpu-smoke", "overlays/gpu-8x", "overlays/gpu-2x8"):
        served[f"kustomize {overlay}"] = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / overlay)],
                                                        capture_output=True, text=True, check=True).stdout

    run_files = {f"s3://{path}": store.fs.cat_file(path) for path in store.fs.find(spec.run_url)}
    ray_files = {str(p): p.read_bytes() for p in temp_dir.rglob("*") if p.is_file() and not p.is_symlink()}
    assert any("/checkpoint.pt" in name for name in run_files) and any("state.json" in n for n in run_files)
    assert sum(name.endswith((".log", ".err", ".out")) for name in ray_files) > 10
    # the search reads what the files hold: the driver's last words are in a log under the temp dir
    last_line = served["ray job logs"].strip().splitlines()[-1].encode()
    assert any(last_line in data for data in ray_files.values()), last_line

    everything = [*run_files.items(), *ray_files.items(), *((k, v.encode()) for k, v in served.items())]
    assert "ray job list" in [what for what, data in everything if control.encode() in data]
    leaks = [f"{what} holds {name}" for what, data in everything
             for name, value in secrets.items() if value.encode() in data]
    assert leaks == [], "\n".join(leaks[:40])
    print(f"searched {len(run_files)} run-store files, {len(ray_files)} files under Ray's temp dir "
          f"({sum(map(len, ray_files.values())) / 2**20:.1f} MiB), {len(served)} served texts: no secret")
