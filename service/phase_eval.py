"""End-of-phase evaluation (sample grid, SWD) as Ray tasks on a training node, beside the next phase's training.

A phase switch used to wait for the grid and SWD in the driver. Now the coordinator commits a phase, moves
state.json on, and starts the phase's evaluation once the next phase is training (its first figures are in);
the task reads the committed checkpoint from the run store (verified, like every reader), writes
samples/<phase>.png and phases/<phase>/eval.json, and returns the evaluation. The run store's order holds:
COMMITTED comes before state.json moves past the phase, the phase's artifacts after. The coordinator waits for
every evaluation before it writes FINISHED, and before it leaves after a stop or a failure; a driver killed
with one in flight loses no commit, and the next `progan train` of the run starts the evaluations of the
committed phases whose artifacts are missing.

Where it runs: with `use_gpu`, on a node with GPUs, on its first GPU; else where Ray places it. It reserves no
CPU or GPU: by the time a phase is committed the next phase's worker group holds every one the run was given
(it was brought up before the previous phase ended), so a task that reserved one would wait for that whole
phase. It shares them for the few seconds it takes, with bounded memory (`phase_artifacts` streams).
"""

from __future__ import annotations

from dataclasses import asdict

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from service.artifacts import evaluated, phase_artifacts
from service.runstore import RunStore
from service.schedule import Phase
from service.spec import Spec


@ray.remote(num_cpus=0, num_gpus=0)
def evaluate_phase(spec: dict, phase: dict) -> dict:
    spec, phase = Spec.model_validate(spec), Phase(**phase)
    torch.set_num_threads(max(1, int(spec.cpus_per_worker)))
    where = torch.device("cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu")
    return phase_artifacts(RunStore(spec.run_url, spec.storage_options), spec, phase, where)


def gpu_node() -> str | None:
    """A live node with GPUs, for the evaluation of a GPU run."""
    return next((n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0), None)


class PhaseEvaluations:
    """The evaluations in flight, by phase."""

    def __init__(self, spec: Spec, store: RunStore) -> None:
        self.spec = spec
        self.store = store
        self.pending: dict[int, tuple[Phase, ray.ObjectRef]] = {}
        self.deferred: list[Phase] = []

    def defer(self, phase: Phase) -> None:
        """Evaluate `phase` once `start_deferred` is called: after the next phase's first steps, so that on a
        small machine the evaluation does not compete with the next group's start."""
        self.deferred.append(phase)

    def start_deferred(self) -> None:
        for phase in self.deferred:
            self.start(phase)
        self.deferred = []

    def start(self, phase: Phase) -> None:
        options = {}
        if self.spec.use_gpu and (node := gpu_node()):
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
        ref = evaluate_phase.options(**options).remote(self.spec.model_dump(mode="json"), asdict(phase))
        self.pending[phase.index] = (phase, ref)

    def missing(self, phases: list[Phase]) -> list[Phase]:
        """Committed phases whose sample grid or eval.json is not in the store (a driver that went down with
        their evaluation in flight)."""
        fs, layout = self.store.fs, self.store.layout
        return [p for p in phases if not fs.exists(layout.samples(p))
                or (evaluated(self.spec, p) and not fs.exists(layout.evaluation(p)))]

    def finished(self, timeout: float = 0) -> list[tuple[Phase, dict]]:
        """The evaluations done within `timeout` seconds, in phase order; a failed one raises its error."""
        refs = [ref for _, ref in self.pending.values()]
        if not refs:
            return []
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        results = []
        for index in sorted(self.pending):
            phase, ref = self.pending[index]
            if ref in done:
                del self.pending[index]
                results.append((phase, ray.get(ref)))
        return results

    def wait_all(self) -> list[tuple[Phase, dict]]:
        self.start_deferred()
        return self.finished(timeout=None)
