"""The run actor: the one place on the head node where the coordinator and the workers meet during a run.

It serves the run's Prometheus endpoint, takes the workers' periodic reports, answers them with the stop
flag, keeps the latest figures for the driver's progress line, and holds a phase's workers until the
coordinator releases that phase (see `Coordinator.run_phase`).
"""

from __future__ import annotations

import ipaddress
import time

import ray

from service.metrics import RunMetrics


@ray.remote(num_cpus=0, max_concurrency=4)
class RunActor:
    def __init__(self, run: str, port: int, host: str) -> None:
        self.metrics = RunMetrics(run)
        self.host = host
        self.port = self.metrics.serve(port, host)
        self.stop = False
        self.phase: dict = {}
        self.latest: dict[int, dict] = {}
        self.group_starts = 0
        self.starts: list[int] = []  # the phase's image count at each start of its worker group
        self.rollback_count = 0  # of the current phase, as are the next two
        self.nonfinite_steps = 0
        self.failure: str | None = None
        self.notes: list[str] = []  # lines for the console, the whole run's, in order
        self.released: dict[int, bool] = {}
        self.waiting: dict[int, float] = {}

    def address(self) -> tuple[str, int]:
        """Host (as written in a URL) and port where clients reach the endpoint: the node's address when it
        listens on all of them."""
        bound = ipaddress.ip_address(self.host)
        host = ray.util.get_node_ip_address() if bound.is_unspecified else self.host
        return (f"[{host}]" if ":" in host else host), self.port

    def set_info(self, info: dict) -> None:
        self.metrics.set_info(**info)

    def set_state(self, state: str) -> None:
        self.metrics.set_state(state)

    def set_phase(self, phase: dict) -> None:
        self.phase = dict(phase, started=time.time())
        self.latest = {}
        self.group_starts = 0
        self.starts = []
        self.rollback_count, self.nonfinite_steps, self.failure = 0, 0, None
        self.metrics.set_phase(**{k: phase[k] for k in (
            "index", "count", "resolution", "kind", "images_target", "run_images_before", "run_images_target")})

    def worker_started(self, rank: int, phase_index: int, phase_images: int) -> None:
        if rank != 0:
            return
        self.group_starts += 1
        self.starts.append(phase_images)
        if self.group_starts > 1:
            self.metrics.worker_group_restarted()
        self.latest[0] = dict(self.latest.get(0, {}), phase_images=phase_images)

    def report(self, rank: int, world_size: int, stats: dict) -> bool:
        self.metrics.report(rank, world_size, stats)
        self.latest[rank] = dict(stats, world_size=world_size, at=time.time())
        return self.stop

    def nonfinite_step(self, phase_index: int) -> None:
        self.nonfinite_steps += 1
        self.metrics.nonfinite_step()

    def rolled_back(self, phase_index: int, note: str) -> None:
        self.rollback_count += 1
        self.metrics.rolled_back()
        self.notes.append(note)

    def note(self, text: str) -> None:
        """A line for the console, printed by the driver (a worker's own output goes to the Ray log file)."""
        self.notes.append(text)

    def rollbacks(self, phase_index: int) -> int:
        """The running phase's rollbacks so far, so that a restarted group goes on counting."""
        return self.rollback_count if self.phase.get("index") == phase_index else 0

    def phase_failed(self, phase_index: int, reason: str) -> None:
        self.failure = reason

    def checkpoint_committed(self, seconds: float) -> None:
        self.metrics.checkpoint_committed(seconds)

    def set_swd(self, levels: dict) -> None:
        self.metrics.set_swd(levels)

    def release(self, phase_index: int) -> None:
        self.released[phase_index] = True

    def call_off(self, phase_index: int) -> None:
        self.released.setdefault(phase_index, False)

    def may_start(self, phase_index: int) -> bool | None:
        """A worker's question before it trains: True to go, False to return at once, None to ask again."""
        self.waiting.setdefault(phase_index, time.time())
        return self.released.get(phase_index)

    def waiting_since(self, phase_index: int) -> float | None:
        """When the first worker of that phase's group began to wait for its release."""
        return self.waiting.get(phase_index)

    def request_stop(self) -> None:
        self.stop = True

    def progress(self) -> dict:
        """Phase, rank 0's latest figures, the group's rate, and the starts and restarts of its worker group."""
        rank0 = self.latest.get(0, {})
        rate = sum(s.get("images_per_second", 0.0) for s in self.latest.values())
        return {"phase": self.phase, "rank0": rank0, "images_per_second": rate,
                "restarts": max(0, self.group_starts - 1), "starts": list(self.starts),
                "nonfinite_steps": self.nonfinite_steps, "rollbacks": self.rollback_count, "failure": self.failure,
                "notes": list(self.notes)}
