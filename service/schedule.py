"""The growth schedule and the run's state machine, as pure functions of their inputs (no Ray, no torch, no I/O).

Phase 0 trains 4² stable; each further resolution r gets a fade phase (the new layers blend in as alpha goes
0 → 1) and a stable phase. The run's state moves only through `transition(state, event)`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from enum import Enum

from service.spec import Phase, Spec, resolutions_up_to


def build_schedule(spec: Spec) -> list[Phase]:
    phases: list[Phase] = []
    for res in resolutions_up_to(spec.resolution):
        kinds = [("stable", spec.stable_kimg[res])] if res == 4 else [("fade", spec.fade_kimg[res]), ("stable", spec.stable_kimg[res])]
        for kind, kimg in kinds:
            batch = spec.minibatch[res]
            images = math.ceil(kimg * 1000 / batch) * batch
            phases.append(Phase(len(phases), res, kind, images, batch, spec.lr[res], spec.workers[res]))
    return extend_to_total(phases, round(spec.total_kimg * 1000))


def extend_to_total(phases: list[Phase], total_images: int) -> list[Phase]:
    """The final stable phase trains on until the run has shown total_images (rounded up to a whole batch), as
    the reference trains at the final resolution until total_kimg; a total the schedule already reaches
    changes nothing."""
    last = phases[-1]
    missing = total_images - sum(p.images for p in phases[:-1])
    images = max(last.images, math.ceil(missing / last.batch) * last.batch)
    return [*phases[:-1], replace(last, images=images)]


class Status(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    FINISHED = "FINISHED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


@dataclass(frozen=True)
class PhaseRecord:
    """A committed phase: where its checkpoint is and what it cost."""

    index: int
    name: str
    images: int
    seconds: float  # wall time of the phase as the driver saw it, bring-up and commit included
    committed_at: float
    first_step_at: float = 0.0  # when the workers took their first and last step (wall clock)
    last_step_at: float = 0.0
    images_per_second: float = 0.0  # global training throughput over the phase
    # each worker group that trained in the phase: the image count it started at, the node id of each rank
    groups: tuple[dict, ...] = ()
    first_step_started_at: float = 0.0  # when the first step began (first_step_at: when it ended)


@dataclass(frozen=True)
class RunState:
    status: Status = Status.PENDING
    phase: int = 0  # the phase running, or the one to run next
    phase_count: int = 1
    reason: str | None = None
    committed: tuple[PhaseRecord, ...] = field(default_factory=tuple)
    restarts: int = 0
    nonfinite_steps: int = 0  # training steps skipped for a non-finite loss or gradient, whole run
    rollbacks: int = 0  # phase rollbacks after too many non-finite steps in a row, whole run

    def to_json(self) -> str:
        d = asdict(self)
        d["status"] = self.status.value
        return json.dumps(d, indent=2, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> RunState:
        """The state, or ValueError saying what is wrong with the text: a state.json may be torn or edited."""
        try:
            d = json.loads(text)
            d["status"] = Status(d["status"])
            d["committed"] = tuple(PhaseRecord(**{**r, "groups": tuple(r.get("groups", ()))}) for r in d["committed"])
            state = RunState(**d)
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise ValueError(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}") from None
        state.check()
        return state

    def check(self) -> None:
        """ValueError unless the fields agree: a phase of the schedule, and the phases before it committed."""
        if not (isinstance(self.phase_count, int) and isinstance(self.phase, int) and 0 <= self.phase < self.phase_count):
            raise ValueError(f"phase {self.phase!r} is not one of the run's {self.phase_count!r} phases")
        done = self.phase + 1 if self.status is Status.FINISHED else self.phase
        if [r.index for r in self.committed] != list(range(done)):
            raise ValueError(f"committed phases {[r.index for r in self.committed]} do not match phase {self.phase}")

    @property
    def last_committed(self) -> PhaseRecord | None:
        return self.committed[-1] if self.committed else None


# Events ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Begin a new run or continue a stopped or failed one at its current phase."""


@dataclass(frozen=True)
class PhaseCommitted:
    record: PhaseRecord


@dataclass(frozen=True)
class Fail:
    reason: str


@dataclass(frozen=True)
class Stop:
    reason: str = "stopped by request"


@dataclass(frozen=True)
class WorkersRestarted:
    count: int = 1


@dataclass(frozen=True)
class NonFiniteSteps:
    """A phase skipped `steps` non-finite steps and rolled back `rollbacks` times."""

    steps: int
    rollbacks: int = 0


@dataclass(frozen=True)
class RollBack:
    """A committed phase failed verification: uncommit it and every later one, and run it again."""

    phase: int


Event = Start | PhaseCommitted | Fail | Stop | WorkersRestarted | NonFiniteSteps | RollBack


class IllegalTransition(Exception):
    pass


def new_run(phase_count: int) -> RunState:
    return RunState(phase_count=phase_count)


def transition(state: RunState, event: Event) -> RunState:
    """The next state, or IllegalTransition. FINISHED is final; FAILED and STOPPED runs can be started again,
    and a RUNNING one too: its driver died without a word, and a new driver takes over at the same phase."""
    s, e = state.status, event
    if isinstance(e, Start) and s is not Status.FINISHED:
        return replace(state, status=Status.RUNNING, reason=None)
    if isinstance(e, PhaseCommitted) and s is Status.RUNNING and e.record.index == state.phase:
        committed = state.committed + (e.record,)
        if state.phase + 1 == state.phase_count:
            return replace(state, status=Status.FINISHED, phase=state.phase, committed=committed)
        return replace(state, phase=state.phase + 1, committed=committed)
    if isinstance(e, RollBack) and s is not Status.FINISHED and 0 <= e.phase < len(state.committed):
        return replace(state, phase=e.phase, committed=state.committed[: e.phase])
    if isinstance(e, WorkersRestarted) and s is Status.RUNNING:
        return replace(state, restarts=state.restarts + e.count)
    if isinstance(e, NonFiniteSteps) and s is Status.RUNNING:
        return replace(state, nonfinite_steps=state.nonfinite_steps + e.steps, rollbacks=state.rollbacks + e.rollbacks)
    if isinstance(e, Fail) and s in (Status.PENDING, Status.RUNNING):
        return replace(state, status=Status.FAILED, reason=e.reason)
    if isinstance(e, Stop) and s in (Status.PENDING, Status.RUNNING):
        return replace(state, status=Status.STOPPED, reason=e.reason)
    raise IllegalTransition(f"{type(e).__name__} is not allowed in state {s.value} (phase {state.phase})")
