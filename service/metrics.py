"""The run's Prometheus metrics (prefix `progan_`, base units, a `run` label on every series).

`RunMetrics` owns one registry and serves it over HTTP; the coordinator and the workers update it through
the run actor (service/run_actor.py), so there is exactly one endpoint per run, on the Ray head node.
"""

from __future__ import annotations

import math
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

STATES = ("pending", "running", "finished", "failed", "stopped")
KINDS = ("fade", "stable")


class MetricsPortInUse(RuntimeError):
    pass


class RunMetrics:
    def __init__(self, run: str) -> None:
        self.run = run
        self.registry = r = CollectorRegistry()
        labels = ["run"]
        self.state = Gauge("progan_run_state", "1 for the run's current state", ["run", "state"], registry=r)
        self.phase_index = Gauge("progan_phase_index", "index of the running phase", labels, registry=r)
        self.phase_count = Gauge("progan_schedule_phases", "phases in the run's schedule", labels, registry=r)
        self.phase_kind = Gauge("progan_phase_kind", "1 for the running phase's kind", ["run", "kind"], registry=r)
        self.phase_started = Gauge("progan_phase_started_timestamp_seconds", "when the running phase started", labels, registry=r)
        self.resolution = Gauge("progan_resolution_pixels", "side of the images the phase trains on", labels, registry=r)
        self.alpha = Gauge("progan_fade_alpha", "weight of the newest layers: 0 to 1 in a fade, 1 when stable", labels, registry=r)
        self.phase_images = Gauge("progan_phase_images_seen", "real images shown to D in this phase", labels, registry=r)
        self.phase_target = Gauge("progan_phase_images_target", "images the phase trains for", labels, registry=r)
        self.run_images = Gauge("progan_run_images_seen", "real images shown to D in the whole run", labels, registry=r)
        self.run_target = Gauge("progan_run_images_target", "images the whole run trains for", labels, registry=r)
        self.loss_g = Gauge("progan_loss_generator", "generator loss (last report)", labels, registry=r)
        self.loss_d = Gauge("progan_loss_discriminator", "discriminator loss (last report)", labels, registry=r)
        self.penalty = Gauge("progan_gradient_penalty", "D's gradient penalty (last report)", labels, registry=r)
        self.rate = Gauge("progan_train_images_per_second", "training throughput of the worker group", labels, registry=r)
        self.worker_rate = Gauge("progan_worker_images_per_second", "training throughput of one worker", ["run", "rank"], registry=r)
        self.corrupt = Counter("progan_corrupt_samples", "data samples skipped as corrupt", labels, registry=r)
        self.ckpt_duration = Histogram(
            "progan_checkpoint_duration_seconds", "time to write and commit a checkpoint", labels, registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )  # fmt: skip
        self.ckpt_last = Gauge("progan_checkpoint_last_success_timestamp_seconds", "when the last checkpoint was committed", labels, registry=r)
        self.restarts = Counter("progan_worker_group_restarts", "times Ray Train restarted the worker group", labels, registry=r)
        self.workers = Gauge("progan_workers", "workers of the group training now (0 while none is)", labels, registry=r)
        self.workers_wanted = Gauge("progan_workers_wanted", "workers the phase asks for (an elastic range's max)", labels, registry=r)
        self.waiting = Gauge("progan_waiting_for_workers", "workers the phase waits for because the cluster lacks room (0: none)", labels, registry=r)
        self.nonfinite = Counter("progan_nonfinite_steps", "training steps skipped for a non-finite loss or gradient", labels, registry=r)
        self.rollbacks = Counter("progan_rollbacks", "phase rollbacks to the last good checkpoint after non-finite steps", labels, registry=r)
        self.swd = Gauge("progan_swd", "sliced Wasserstein distance x1e3 of the last committed phase", ["run", "level"], registry=r)
        self.build = Info("progan_build", "spec hash and versions", labels, registry=r)
        self._corrupt_seen: dict[tuple[int, int], int] = {}
        self._run_images_before = 0
        self._touch()

    def _touch(self) -> None:
        """Create every series so that dashboards and alerts see zeros rather than nothing."""
        for m in (self.phase_index, self.phase_count, self.phase_started, self.resolution, self.alpha, self.phase_images,
                  self.phase_target, self.run_images, self.run_target, self.loss_g, self.loss_d, self.penalty, self.rate,
                  self.corrupt, self.ckpt_duration, self.ckpt_last, self.restarts, self.workers, self.workers_wanted,
                  self.waiting, self.nonfinite, self.rollbacks):
            m.labels(self.run)
        for kind in KINDS:
            self.phase_kind.labels(self.run, kind)
        self.set_state("pending")

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint on `addr` (the spec's metrics_host: loopback unless a pod opens it to its
        network); returns the bound port (a free one when port is 0)."""
        try:
            server, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            raise MetricsPortInUse(
                f"metrics port {port} on the head node is not available ({e.strerror}, on {addr}); "
                "set metrics_port in the spec to a free port, or 0 to pick one"
            ) from None
        return server.server_port

    def set_info(self, **info: str) -> None:
        self.build.labels(self.run).info(info)

    def set_state(self, state: str) -> None:
        for s in STATES:
            self.state.labels(self.run, s).set(1 if s == state else 0)

    def set_phase(self, index: int, count: int, resolution: int, kind: str, images_target: int,
                  run_images_before: int, run_images_target: int) -> None:
        self.phase_index.labels(self.run).set(index)
        self.phase_count.labels(self.run).set(count)
        self.resolution.labels(self.run).set(resolution)
        for k in KINDS:
            self.phase_kind.labels(self.run, k).set(1 if k == kind else 0)
        self.phase_started.labels(self.run).set(time.time())
        self.phase_target.labels(self.run).set(images_target)
        self.run_target.labels(self.run).set(run_images_target)
        self._run_images_before = run_images_before
        self.phase_images.labels(self.run).set(0)
        self.run_images.labels(self.run).set(run_images_before)
        self.alpha.labels(self.run).set(0 if kind == "fade" else 1)

    def report(self, rank: int, world_size: int, stats: dict) -> None:
        """One worker's periodic report. Rank 0 speaks for the group; each rank adds its own rate and
        corrupt-sample count (cumulative per data stream, whose `stream` id changes when a worker restarts)."""
        self.worker_rate.labels(self.run, str(rank)).set(stats["images_per_second"])
        key = (rank, stats.get("stream", 0))
        delta = stats.get("corrupt_samples", 0) - self._corrupt_seen.get(key, 0)
        if delta > 0:
            self.corrupt.labels(self.run).inc(delta)
            self._corrupt_seen[key] = stats["corrupt_samples"]
        if rank != 0:
            return
        self.phase_images.labels(self.run).set(stats["phase_images"])
        self.run_images.labels(self.run).set(self._run_images_before + stats["phase_images"])
        self.alpha.labels(self.run).set(stats["alpha"])
        self.rate.labels(self.run).set(stats["images_per_second"] * world_size)
        for gauge, key in ((self.loss_g, "loss_g"), (self.loss_d, "loss_d"), (self.penalty, "penalty")):
            if key in stats:
                gauge.labels(self.run).set(float(stats[key]))  # a NaN or inf is exported as such and alerts

    def checkpoint_committed(self, seconds: float) -> None:
        self.ckpt_duration.labels(self.run).observe(seconds)
        self.ckpt_last.labels(self.run).set(time.time())

    def worker_group_restarted(self) -> None:
        self.restarts.labels(self.run).inc()

    def set_workers(self, count: int) -> None:
        self.workers.labels(self.run).set(count)

    def set_workers_wanted(self, count: int) -> None:
        self.workers_wanted.labels(self.run).set(count)

    def set_waiting(self, count: int) -> None:
        self.waiting.labels(self.run).set(count)

    def nonfinite_step(self) -> None:
        self.nonfinite.labels(self.run).inc()

    def rolled_back(self) -> None:
        self.rollbacks.labels(self.run).inc()

    def set_swd(self, levels: dict[str, float]) -> None:
        for level, value in levels.items():
            self.swd.labels(self.run, str(level)).set(value if math.isfinite(value) else math.nan)
