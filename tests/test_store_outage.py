"""Object-store outages end to end: a real SeaweedFS server, started by this test (not the session's), is stopped
mid-phase and started again on the same folder and ports while a real Ray run trains on it (dataset shards, Ray
Train checkpoints, commits and state.json all on that server). A short outage costs only its time: no worker
group restart, no failure, every phase committed once. An outage longer than the retry budget fails the run with
a clear reason; once the server is back, the same `progan train` resumes and finishes, the earlier commits
untouched."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from service.runstore import RunStore
from service.schedule import Status, build_schedule
from service.spec import StorageOptions, parse_spec
from tests.conftest import PROGAN, run_env, running_s3_server, tiny_spec, wait_for

pytestmark = pytest.mark.slow

# The client sees more than this: the server's stop, then its start until it takes writes again (seconds on a busy
# machine), and s3fs's own retries add to each try. 3 s keeps that within the budget below.
SHORT_OUTAGE_SECONDS = 3
RETRY_SECONDS = 10  # the spec's budget: more than the short outage, so that one is waited out


def in_phase_checkpoints(store: RunStore, phase) -> list[str]:
    store.fs.invalidate_cache()
    return store.fs.glob(f"{store.layout.train_dir(phase)}/checkpoint_*/checkpoint.pt")


def test_a_short_outage_is_waited_out_and_a_long_one_fails_then_resumes(tmp_path, ray_cluster):
    with running_s3_server() as server:
        bucket = server.new_bucket()
        dataset = f"s3://{bucket}/builtin8"
        subprocess.run([PROGAN, "prepare", "builtin", dataset, "--resolution", "8", "--limit", "64", "--shard-size",
                        "32"], check=True, capture_output=True, env=run_env(server.env()))
        options = {"endpoint_url": server.endpoint, "retry_seconds": RETRY_SECONDS}
        spec_path = tiny_spec(tmp_path, dataset, f"s3://{bucket}/runs", "outage", resolution=8,
                              stable_kimg={4: 0.016, 8: 0.8}, fade_kimg=0.8, checkpoint_kimg=0.128, max_failures=0,
                              storage_options=options)
        spec = parse_spec(spec_path.read_text())
        store = RunStore(spec.run_url, StorageOptions(endpoint_url=server.endpoint))
        phases = build_schedule(spec)
        env = run_env(server.env(), ray_cluster.env())
        command = [PROGAN, "train", str(spec_path), "--address", ray_cluster.address]

        log = tmp_path / "first.log"
        driver = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
        try:
            # A short outage in the middle of the fade, once it has written a Ray Train checkpoint.
            wait_for(lambda: in_phase_checkpoints(store, phases[1]), 300, "a checkpoint of the fade", driver)
            server.stop()
            time.sleep(SHORT_OUTAGE_SECONDS)
            server.start()
            # An outage longer than the budget in the last phase: the server stays down until the driver gives up.
            wait_for(lambda: in_phase_checkpoints(store, phases[2]), 300, "a checkpoint of the last phase", driver)
            committed_before = json.loads(store.fs.cat_file(store.layout.committed_marker(phases[1])))
            server.stop()
            assert driver.wait(timeout=300) == 1, log.read_text()[-4000:]
        finally:
            if driver.poll() is None:
                driver.kill()
        output = log.read_text()
        server.start()

        assert "object store unreachable" in output and "retry budget of 10 s" in output, output[-4000:]
        failed = [line for line in output.splitlines() if line.startswith(f"{spec.run_url}: FAILED: ")]
        assert len(failed) == 1, output[-4000:]
        state = store.read_state()
        assert [r.index for r in state.committed] == [0, 1] and state.restarts == 0, state
        assert state.status in (Status.FAILED, Status.RUNNING)  # RUNNING when the store was down for that write too
        if state.status is Status.FAILED:
            assert state.reason.startswith("object store unreachable: ")

        again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
        state = store.read_state()
        assert state.status is Status.FINISHED and [r.index for r in state.committed] == [p.index for p in phases]
        assert state.restarts == 0
        assert json.loads(store.fs.cat_file(store.layout.committed_marker(phases[1]))) == committed_before
        for p in phases:
            store.read_checkpoint(p, spec)
