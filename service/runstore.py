"""The run store: one folder per run in object storage (DESIGN.md, "Run store").

`RunLayout` is the pure part (where each thing lives); `RunStore` reads and writes through fsspec. A phase
checkpoint counts only once its COMMITTED marker exists, and state.json is replaced atomically and last.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from service.schedule import Phase, RunState
from service.spec import Spec, SpecError, StorageOptions, parse_spec, spec_differences
from workers.storage import filesystem, join, write_atomic


class RunStoreError(RuntimeError):
    pass


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

    def exists(self) -> bool:
        return self.fs.exists(self.layout.state)

    def check_writable(self) -> None:
        probe = join(self.path, ".write-probe")
        try:
            self.fs.makedirs(self.path, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm(probe)
        except Exception as e:  # noqa: BLE001 - any storage failure means the same thing here
            raise RunStoreError(f"run store {self.url} is not writable: {type(e).__name__}: {e}") from None

    def read_state(self) -> RunState:
        return RunState.from_json(self.fs.cat_file(self.layout.state).decode())

    def write_state(self, state: RunState) -> None:
        write_atomic(self.fs, self.layout.state, state.to_json().encode())

    def read_spec(self) -> Spec:
        try:
            return parse_spec(self.fs.cat_file(self.layout.spec).decode(), self.url_of(self.layout.spec))
        except SpecError as e:
            raise RunStoreError(f"the run's stored spec is not valid: {e}") from None

    def write_spec(self, spec: Spec) -> None:
        write_atomic(self.fs, self.layout.spec, spec.to_yaml().encode())

    def refuse_changed_spec(self, spec: Spec) -> None:
        stored = self.read_spec()
        diffs = spec_differences(stored, spec)
        if diffs:
            raise RunStoreError(
                f"run {self.url} exists with a different spec; these fields change the model or schedule:\n  "
                + "\n  ".join(diffs) + "\nresume with the stored spec, or start over with --new-run"
            )

    def clear(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)

    def commit_phase(self, phase: Phase, checkpoint: bytes) -> None:
        write_atomic(self.fs, self.layout.checkpoint(phase), checkpoint)
        write_atomic(self.fs, self.layout.committed_marker(phase), json.dumps({"committed_at": time.time()}).encode())

    def is_committed(self, phase: Phase) -> bool:
        return self.fs.exists(self.layout.committed_marker(phase))

    def read_checkpoint(self, phase: Phase) -> bytes:
        """A committed phase checkpoint; an uncommitted one is never read."""
        if not self.is_committed(phase):
            raise RunStoreError(f"phase {phase.name} of {self.url} has no committed checkpoint")
        return self.fs.cat_file(self.layout.checkpoint(phase))

    def write_bytes(self, path: str, data: bytes) -> None:
        write_atomic(self.fs, path, data)

    def stop_requested(self) -> bool:
        return self.fs.exists(self.layout.stop_request)

    def request_stop(self) -> None:
        self.fs.pipe_file(self.layout.stop_request, json.dumps({"requested_at": time.time()}).encode())

    def clear_stop_request(self) -> None:
        if self.stop_requested():
            self.fs.rm(self.layout.stop_request)

    def write_driver(self, info: dict) -> None:
        write_atomic(self.fs, self.layout.driver, json.dumps(info, indent=2).encode())

    def read_driver(self) -> dict:
        return json.loads(self.fs.cat_file(self.layout.driver)) if self.fs.exists(self.layout.driver) else {}
