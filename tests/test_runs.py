"""`progan runs STORAGE` on a local folder and on the real S3 server, with a run in every state.

The states are written the way the coordinator writes them (RunStore and the schedule's transitions), without
training, so that the listing is checked against every state in seconds."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from service.runstore import RunStore
from service.schedule import Fail, PhaseCommitted, PhaseRecord, Start, Stop, build_schedule, new_run, transition
from service.spec import parse_spec
from tests.conftest import PROGAN, run_env

# run name -> (state, phase shown, committed images); phases of an 8² spec with minibatch 16: 3 x 32 images.
EXPECTED = {
    "a-pending": ("PENDING", "1/3 00-0004-stable", 0),
    "b-running": ("RUNNING", "2/3 01-0008-fade", 32),
    "c-finished": ("FINISHED", "3/3 02-0008-stable", 96),
    "d-failed": ("FAILED", "1/3 00-0004-stable", 0),
    "e-stopped": ("STOPPED", "3/3 02-0008-stable", 64),
}


def write_runs(storage: str) -> None:
    """One run per state under `storage`, and a folder that is not a run."""
    for name in EXPECTED:
        spec = parse_spec(f"run: {name}\ndataset: d\nstorage: {storage}\nresolution: 8\nminibatch: 16\n"
                          "fade_kimg: 0.032\nstable_kimg: 0.032\n")
        store = RunStore(spec.run_url)
        phases = build_schedule(spec)
        state = new_run(len(phases))
        store.write_spec(spec)
        commits = {"b-running": 1, "c-finished": 3, "e-stopped": 2}.get(name, 0)
        if name != "a-pending":
            state = transition(state, Start())
        for p in phases[:commits]:
            state = transition(state, PhaseCommitted(PhaseRecord(p.index, p.name, p.images, 1.0, time.time() - 120)))
        if name == "d-failed":
            state = transition(state, Fail("RuntimeError: boom"))
        if name == "e-stopped":
            state = transition(state, Stop())
        store.write_state(state)
    scratch = RunStore(f"{storage}/scratch")
    scratch.fs.makedirs(scratch.path, exist_ok=True)
    scratch.fs.pipe_file(f"{scratch.path}/notes.txt", b"not a run")


def check_listing(storage: str, env: dict[str, str]) -> None:
    result = subprocess.run([PROGAN, "runs", storage, "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    rows = {r["name"]: r for r in listing["runs"]}
    assert list(rows) == sorted(EXPECTED)
    for name, (state, phase, images) in EXPECTED.items():
        row = rows[name]
        assert (row["state"], row["phase"], row["images"]) == (state, phase, images), row
        assert row["url"] == f"{storage.rstrip('/')}/{name}"
        assert row["resolution"] == (8 if phase.startswith(("2/", "3/")) else 4)
        if images:
            assert 100 < row["last_commit_age_seconds"] < 3600
        else:
            assert row["last_commit_at"] is None and row["last_commit_age_seconds"] is None
    assert listing["not_runs"] == ["scratch"]

    table = subprocess.run([PROGAN, "runs", storage], capture_output=True, text=True, env=env, timeout=120)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    for name, (state, phase, _) in EXPECTED.items():
        row = next(line for line in lines if f" {name} " in line)
        assert state in row and phase in row
    assert "never" in next(line for line in lines if " a-pending " in line)
    assert "m ago" in next(line for line in lines if " c-finished " in line)
    assert "not runs (no state.json): scratch" in table.stdout


def test_runs_on_a_local_store(tmp_path):
    storage = str(tmp_path / "runs")
    write_runs(storage)
    check_listing(storage, run_env())


def test_runs_on_s3(s3_server, s3_bucket):
    storage = f"s3://{s3_bucket}/team/runs"
    write_runs(storage)
    check_listing(storage, run_env(s3_server.env()))


@pytest.mark.parametrize("where", ["missing", "file"])
def test_runs_refuses_a_storage_that_is_not_a_folder(tmp_path, where):
    path = tmp_path / "nothing"
    if where == "file":
        path.write_text("x")
    result = subprocess.run([PROGAN, "runs", str(path)], capture_output=True, text=True, env=run_env(), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {path} does not exist" if where == "missing"
                                                  else f"error: {path} is not a folder"]
