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
        self.starts: list[int] = []  # the phase's image count at each start of its worker group
        self.restarts: dict[int, int] = {}  # phase index -> retries Ray Train made of its worker group
        self.groups: dict[int, list[dict]] = {}  # phase index -> each group that trained: images, node of each rank
        self.group_state: dict[int, dict] = {}  # phase index -> what its controller does now, since when
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
        self.starts = []
        self.rollback_count, self.nonfinite_steps, self.failure = 0, 0, None
        self.metrics.set_phase(**{k: phase[k] for k in (
            "index", "count", "resolution", "kind", "images_target", "run_images_before", "run_images_target")})
        self.metrics.set_workers_wanted(phase["workers_wanted"])

    def worker_started(self, rank: int, phase_index: int, phase_images: int, world_size: int, node_id: str) -> None:
        """A rank of a group that has loaded its state and trains from `phase_images`, on node `node_id`."""
        groups = self.groups.setdefault(phase_index, [])
        if not groups or groups[-1]["images"] != phase_images or rank in groups[-1]["nodes"]:
            groups.append({"images": phase_images, "nodes": {}})
        groups[-1]["nodes"][rank] = node_id
        if rank != 0:
            return
        self.starts.append(phase_images)
        self.metrics.set_workers(world_size)
        self.latest[0] = dict(self.latest.get(0, {}), phase_images=phase_images, world_size=world_size)

    # Ray Train's controller of a phase (service/group_watch.py) -------------------------------------------------

    def group_scheduling(self, phase_index: int, workers: int) -> None:
        """A group of `workers` is being brought up: since the last one ran, when there was one."""
        previous = self.group_state.get(phase_index, {})
        since = previous["since"] if previous.get("state") in ("waiting", "restarting") else time.time()
        self.group_state[phase_index] = dict(previous, state="scheduling", since=since, workers=workers)

    def group_running(self, phase_index: int) -> None:
        self.group_state[phase_index] = dict(self.group_state.get(phase_index, {}), state="running")

    def group_waiting(self, phase_index: int) -> None:
        """A group start timed out waiting for resources; Ray Train tries again."""
        self.group_state[phase_index] = dict(self.group_state.get(phase_index, {}), state="waiting")

    def group_restarting(self, phase_index: int, reason: str) -> None:
        self.restarts[phase_index] = self.restarts.get(phase_index, 0) + 1
        self.group_state[phase_index] = {"state": "restarting", "since": time.time(), "workers": 0, "reason": reason}
        self.metrics.worker_group_restarted()
        self.metrics.set_workers(0)

    def group(self, phase_index: int) -> dict:
        """The controller's latest word on that phase's group, and the groups that trained in it."""
        return {**self.group_state.get(phase_index, {}), "restarts": self.restarts.get(phase_index, 0),
                "groups": [{"images": g["images"], "nodes": [g["nodes"][r] for r in sorted(g["nodes"])]}
                           for g in self.groups.get(phase_index, [])]}

    def set_waiting(self, workers: int) -> None:
        self.metrics.set_waiting(workers)

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
        group = self.group_state.get(self.phase.get("index"), {})
        return {"phase": self.phase, "rank0": rank0, "images_per_second": rate,
                "restarts": self.restarts.get(self.phase.get("index"), 0), "restart_reason": group.get("reason", ""),
                "starts": list(self.starts),
                "nonfinite_steps": self.nonfinite_steps, "rollbacks": self.rollback_count, "failure": self.failure,
                "notes": list(self.notes)}
