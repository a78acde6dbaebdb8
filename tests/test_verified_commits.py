"""Verified commits end to end (real Ray, token auth): a committed checkpoint whose bytes were flipped between two
`progan train` invocations is never loaded; the coordinator says so in one line, moves it aside, trains that phase
again from the commit before it, and the run finishes with every commit verifying."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from service.runstore import RunStore
from service.schedule import Status, build_schedule
from service.spec import parse_spec
from tests.conftest import PROGAN, tiny_spec, wait_for
from tests.test_coordinator import start_train, train

pytestmark = pytest.mark.slow


def test_a_flipped_committed_checkpoint_is_retrained_and_the_run_finishes(tmp_path, s3_server, ray_cluster,
                                                                          local_dataset):
    spec_path = tiny_spec(tmp_path, local_dataset, str(tmp_path / "runs"), "flipped", resolution=8, workers=1,
                          stable_kimg={4: 0.032, 8: 0.016}, fade_kimg=2.4, checkpoint_kimg=10)
    spec = parse_spec(spec_path.read_text())
    store = RunStore(str(tmp_path / "runs" / "flipped"))
    phases = build_schedule(spec)

    # First invocation: stopped once phase 0 is committed, while phase 1 (a long fade) trains.
    log = tmp_path / "first.log"
    driver = start_train(spec_path, ray_cluster, s3_server, log)
    try:
        wait_for(lambda: store.is_committed(phases[0]), 300, "phase 0's commit", driver)
        stop = subprocess.run([PROGAN, "stop", store.url], capture_output=True, text=True)
        assert stop.returncode == 0, stop.stderr
        assert driver.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    stopped = store.read_state()
    assert stopped.status is Status.STOPPED and 1 <= stopped.phase < len(phases), log.read_text()[-3000:]

    # Between the invocations, one byte of the commit the next phase starts from is flipped.
    bad = phases[stopped.phase - 1]
    checkpoint = Path(store.layout.checkpoint(bad))
    flipped = bytearray(checkpoint.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    checkpoint.write_bytes(bytes(flipped))

    again = train(spec_path, ray_cluster, s3_server)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-4000:]
    said = [line for line in again.stdout.splitlines() if "sha256 does not match" in line]
    assert len(said) == 1, output[-4000:]
    before = phases[bad.index - 1].name if bad.index else "scratch"
    assert f"phase {bad.name} of {store.url}: checkpoint sha256 does not match the commit record (corrupt): " \
           f"retraining phase {bad.name} from {before}" in said[0]
    assert f"phase {bad.name}: {bad.resolution}² {bad.kind}" in again.stdout  # the bad phase trained again
    assert f"{bad.name}: 1 worker(s) start at 0/" in again.stdout

    state = store.read_state()
    assert state.status is Status.FINISHED
    assert [r.index for r in state.committed] == [p.index for p in phases]
    for p in phases:
        store.read_checkpoint(p, spec)  # every commit verifies
    assert Path(store.layout.checkpoint(bad)).read_bytes() != bytes(flipped)
    rejected = list(Path(store.path, "rejected").glob(f"*/phases/{bad.name}/checkpoint.pt"))
    assert len(rejected) == 1 and rejected[0].read_bytes() == bytes(flipped)  # moved aside, not deleted
