"""The run store: one folder per run in object storage (DESIGN.md, "Run store").

`RunLayout` is the pure part (where each thing lives); `RunStore` reads and writes through fsspec. A phase
checkpoint counts only once its COMMITTED marker exists, and state.json is replaced atomically and last.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from typing import Iterator

from service.schedule import Phase, RunState, build_schedule
from service.spec import Spec, SpecError, StorageOptions, parse_spec, spec_differences
from workers.commit import CheckpointError, commit_record, read_committed
from workers.storage import StorageUnavailable, filesystem, first_line, join, storage_errors, with_retries, write_atomic


class RunStoreError(RuntimeError):
    """A run store that cannot be used as asked; the message is one line naming the object and the problem."""


@dataclass(frozen=True)
class RunLayout:
    root: str  # <storage>/<run>

    @property
    def state(self) -> str:
        return join(self.root, "state.json")

    @property
    def spec(self) -> str:
        return join(self.root, "spec.yaml")

    @property
    def stop_request(self) -> str:
        return join(self.root, "STOP")

    @property
    def driver(self) -> str:
        return join(self.root, "driver.json")

    @property
    def train(self) -> str:
        return join(self.root, "train")

    def train_dir(self, phase: Phase) -> str:
        return join(self.train, phase.name)

    def rejected(self, stamp: str) -> str:
        """Where the files of commits that failed verification are moved aside (never deleted)."""
        return join(self.root, "rejected", stamp)

    def phase_dir(self, phase: Phase) -> str:
        return join(self.root, "phases", phase.name)

    def checkpoint(self, phase: Phase) -> str:
        return join(self.phase_dir(phase), "checkpoint.pt")

    def committed_marker(self, phase: Phase) -> str:
        return join(self.phase_dir(phase), "COMMITTED")

    def evaluation(self, phase: Phase) -> str:
        return join(self.phase_dir(phase), "eval.json")

    def samples(self, phase: Phase) -> str:
        return join(self.root, "samples", f"{phase.name}.png")

    def artifact(self, name: str) -> str:
        return join(self.root, "samples", name)


class RunStore:
    def __init__(self, run_url: str, options: StorageOptions | None = None) -> None:
        self.url = run_url.rstrip("/")
        self.options = options or StorageOptions()
        self.fs, self.path = filesystem(self.url, self.options)
        self.layout = RunLayout(self.path)

    def url_of(self, path: str) -> str:
        """A store path back as a URL that workers on other nodes can open."""
        return self.url + path[len(self.path):]

    def retrying(self, call, path: str, doing: str):
        """call() with the store's retries (storage_options.retry_seconds) over an outage; see `with_retries`."""
        return with_retries(call, f"{self.url_of(path)}: {doing}", self.options.retry_seconds)

    def write(self, path: str, data: bytes) -> None:
        self.retrying(lambda: write_atomic(self.fs, path, data), path, "write")

    @contextlib.contextmanager
    def accessing(self, path: str, doing: str) -> Iterator[None]:
        """Storage failures as one line naming the object: '<url>: cannot <doing>: <reason>'; an outage longer
        than the retry budget stays StorageUnavailable, which the coordinator fails the run on."""
        try:
            yield
        except StorageUnavailable:
            raise
        except storage_errors() as e:
            raise RunStoreError(f"{self.url_of(path)}: cannot {doing}: {type(e).__name__}: {first_line(e)}") from None

    def exists(self) -> bool:
        with self.accessing(self.layout.state, "look for the run"):
            return self.fs.exists(self.layout.state)

    def is_run(self) -> bool:
        """The folder holds a run: its state.json or spec.yaml (a run whose first write was cut short)."""
        with self.accessing(self.path, "look for the run"):
            return self.fs.exists(self.layout.state) or self.fs.exists(self.layout.spec)

    def check_writable(self) -> None:
        probe = join(self.path, ".write-probe")
        try:
            self.fs.makedirs(self.path, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm(probe)
        except storage_errors() as e:
            raise RunStoreError(f"run store {self.url} is not writable: {type(e).__name__}: {first_line(e)}") from None

    def read_state(self) -> RunState:
        """state.json, checked against itself and against the stored spec's schedule."""
        with self.accessing(self.layout.state, "read state.json"):
            raw = self.retrying(lambda: self.fs.cat_file(self.layout.state), self.layout.state, "read state.json")
        phase_count = len(build_schedule(self.read_spec()))
        try:
            state = RunState.from_json(raw.decode())
            if state.phase_count != phase_count:
                raise ValueError(f"it counts {state.phase_count} phases, the stored spec {phase_count}")
        except (UnicodeDecodeError, ValueError) as e:
            raise RunStoreError(f"{self.url_of(self.layout.state)} is not a valid run state: {first_line(e)}") from None
        return state

    def write_state(self, state: RunState) -> None:
        self.write(self.layout.state, state.to_json().encode())

    def read_spec(self) -> Spec:
        with self.accessing(self.layout.spec, "read the run's spec"):
            raw = self.retrying(lambda: self.fs.cat_file(self.layout.spec), self.layout.spec, "read the run's spec")
        try:
            return parse_spec(raw.decode(), self.url_of(self.layout.spec))
        except (UnicodeDecodeError, SpecError) as e:
            raise RunStoreError(f"the run's stored spec is not valid: {first_line(e)}") from None

    def write_spec(self, spec: Spec) -> None:
        self.write(self.layout.spec, spec.to_yaml().encode())

    def refuse_changed_spec(self, spec: Spec) -> None:
        stored = self.read_spec()
        diffs = spec_differences(stored, spec)
        if diffs:
            raise RunStoreError(
                f"run {self.url} exists with a different spec; these fields change the model or schedule: "
                + "; ".join(diffs) + "; resume with the stored spec, or start over with --new-run"
            )

    def clear(self) -> None:
        """Delete the run for --new-run; a folder that is not a run is never deleted."""
        with self.accessing(self.path, "clear the run"):
            if not self.fs.exists(self.path):
                return
            if not self.is_run():
                if not self.fs.ls(self.path):
                    return
                raise RunStoreError(f"{self.url} is not a run (no state.json or spec.yaml): refusing to delete it "
                                    f"for --new-run; choose another run name or storage")
            self.fs.rm(self.path, recursive=True)

    def commit_phase(self, phase: Phase, checkpoint: bytes, spec: Spec) -> None:
        """checkpoint.pt, then COMMITTED with its sha256, size and spec hash: the commit counts once both exist."""
        self.write(self.layout.checkpoint(phase), checkpoint)
        record = commit_record(checkpoint, spec, time.time())
        self.write(self.layout.committed_marker(phase), json.dumps(record).encode())

    def is_committed(self, phase: Phase) -> bool:
        marker = self.layout.committed_marker(phase)
        with self.accessing(marker, "look for the commit"):
            return self.retrying(lambda: self.fs.exists(marker), marker, "look for the commit")

    def read_checkpoint(self, phase: Phase, spec: Spec) -> bytes:
        """A committed phase checkpoint, verified (sha256, size, spec hash); an uncommitted one is never read."""
        if not self.is_committed(phase):
            raise RunStoreError(f"phase {phase.name} of {self.url} has no committed checkpoint")
        with self.accessing(self.layout.checkpoint(phase), "read the checkpoint"):
            path = self.layout.checkpoint(phase)
            return self.retrying(lambda: read_committed(self.fs, path, spec, f"phase {phase.name} of {self.url}"),
                                 path, "read the checkpoint")

    def commit_failure(self, phase: Phase, spec: Spec) -> str | None:
        """Why a committed phase's checkpoint fails verification, or None when it verifies."""
        try:
            self.read_checkpoint(phase, spec)
        except (CheckpointError, RunStoreError) as e:
            return str(e)
        return None

    def set_aside(self, phases: list[Phase]) -> str:
        """Uncommit phases: move their commits and Ray Train checkpoints to rejected/<stamp>/ inside the run
        (kept for a look, never deleted), so that they train again from scratch. Returns that folder's URL."""
        target = self.layout.rejected(time.strftime("%Y%m%dT%H%M%S"))
        with self.accessing(self.path, "move rejected checkpoints aside"):
            for phase in phases:
                for source, kind in ((self.layout.phase_dir(phase), "phases"), (self.layout.train_dir(phase), "train")):
                    # File by file (a local folder stays, empty): s3fs's recursive move also tries to copy the
                    # folder's own key, which S3 does not have.
                    for path in self.fs.find(source):
                        dest = join(target, kind, phase.name, path[len(source):].lstrip("/"))
                        self.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
                        self.fs.mv(path, dest)
        return self.url_of(target)

    def write_bytes(self, path: str, data: bytes) -> None:
        self.write(path, data)

    def stop_requested(self) -> bool:
        return self.fs.exists(self.layout.stop_request)

    def request_stop(self) -> None:
        with self.accessing(self.layout.stop_request, "write the stop request"):
            self.fs.pipe_file(self.layout.stop_request, json.dumps({"requested_at": time.time()}).encode())

    def clear_stop_request(self) -> None:
        if self.stop_requested():
            self.fs.rm(self.layout.stop_request)

    def write_driver(self, info: dict) -> None:
        self.write(self.layout.driver, json.dumps(info, indent=2).encode())

    def read_driver(self) -> dict:
        with self.accessing(self.layout.driver, "read driver.json"):
            if not self.fs.exists(self.layout.driver):
                return {}
            raw = self.fs.cat_file(self.layout.driver)
        try:
            info = json.loads(raw)
        except ValueError as e:
            raise RunStoreError(f"{self.url_of(self.layout.driver)} is not valid JSON: {first_line(e)}") from None
        if not isinstance(info, dict):
            raise RunStoreError(f"{self.url_of(self.layout.driver)} is not a JSON object")
        return info
