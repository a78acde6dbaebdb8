"""`progan runs STORAGE`: the runs under a run store root, one row each, from what the store says.

A run is a folder with a state.json; other folders under the root are not runs and are left out (their names
are returned apart, so that the listing can say how many it skipped).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from service.runstore import RunStore, RunStoreError
from service.schedule import build_schedule
from service.spec import StorageOptions
from workers.storage import filesystem, join


class RunListError(RuntimeError):
    """The storage root cannot be listed."""


@dataclass(frozen=True)
class RunRow:
    name: str
    url: str
    state: str
    phase: str  # "<i>/<N> <name>" of the phase running or next to run; the last one once FINISHED
    resolution: int | None
    images: int  # images of the committed phases
    last_commit_at: float | None  # wall clock of the last phase commit, None before the first


def list_runs(storage: str, options: StorageOptions | None = None) -> tuple[list[RunRow], list[str]]:
    """(the runs under `storage`, sorted by name; the names of the folders there that are not runs)."""
    storage = storage.rstrip("/")
    fs, root = filesystem(storage, options)
    try:
        if not fs.exists(root):
            raise RunListError(f"{storage} does not exist")
        if not fs.isdir(root):
            raise RunListError(f"{storage} is not a folder")
        entries = fs.ls(root, detail=True)
    except RunListError:
        raise
    except Exception as e:  # noqa: BLE001 - unreachable endpoint, refused credentials: one line, not a traceback
        raise RunListError(f"cannot list {storage}: {type(e).__name__}: {e}") from None
    names = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")
    runs, skipped = [], []
    for name in names:
        store = RunStore(join(storage, name), options)
        if store.exists():
            runs.append(describe_run(name, store))
        else:
            skipped.append(name)
    return runs, skipped


def describe_run(name: str, store: RunStore) -> RunRow:
    state = store.read_state()
    last = state.last_committed
    phase, resolution = f"{state.phase + 1}/{state.phase_count}", None
    try:
        current = build_schedule(store.read_spec())[state.phase]
        phase, resolution = f"{phase} {current.name}", current.resolution
    except RunStoreError:  # a stored spec this version cannot read: the state alone still says where the run is
        pass
    return RunRow(name, store.url, state.status.value, phase, resolution, sum(r.images for r in state.committed),
                  last.committed_at if last else None)


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{max(seconds, 0):.0f}s ago"


def as_json(storage: str, runs: list[RunRow], skipped: list[str], now: float | None = None) -> dict:
    now = time.time() if now is None else now
    rows = [dict(asdict(r), last_commit_age_seconds=None if r.last_commit_at is None else round(now - r.last_commit_at, 1))
            for r in runs]
    return {"storage": storage, "runs": rows, "not_runs": skipped}
