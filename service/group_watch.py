"""What Ray Train's controller does with a phase's worker group, told to the run actor as it happens.

A worker that dies before it reaches `train_phase`'s first report (while its group starts, or while it waits for
its release) leaves no trace in the workers' own reports, so the restarts are counted where Ray Train decides
them: in its controller, through a controller callback that runs inside the controller actor. Every retry Ray
Train makes, whatever its cause (a worker or node lost while running or starting, an elastic resize), is one
restart; a group start that timed out waiting for resources is not a restart but a wait, and is reported as such.
"""

from __future__ import annotations

from ray.exceptions import RayActorError
from ray.train import ControllerError
from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller.state import (
    ReschedulingState,
    ResizingState,
    RestartingState,
    RunningState,
    SchedulingState,
)


class GroupWatch(ControllerCallback):
    """Passed in a phase's RunConfig(callbacks=...); `actor` is the run actor."""

    def __init__(self, actor, phase_index: int) -> None:
        self.actor = actor
        self.phase_index = phase_index

    def after_controller_state_update(self, previous_state, current_state) -> None:
        if type(previous_state) is type(current_state):  # the controller re-enters RUNNING at every poll
            return
        if isinstance(current_state, SchedulingState):
            self.actor.group_scheduling.remote(self.phase_index, current_state.scaling_decision.num_workers)
        elif isinstance(current_state, RunningState) and isinstance(previous_state, SchedulingState):
            self.actor.group_running.remote(self.phase_index)
        elif isinstance(current_state, (RestartingState, ReschedulingState)):
            error = current_state.training_failed_error
            if isinstance(getattr(error, "controller_failure", None), WorkerGroupStartupTimeoutError):
                self.actor.group_waiting.remote(self.phase_index)
            else:
                self.actor.group_restarting.remote(self.phase_index, cause(error))
        elif isinstance(current_state, ResizingState):
            self.actor.group_restarting.remote(
                self.phase_index, f"resizing to {current_state.scaling_decision.num_workers} worker(s)")


def cause(error: BaseException | None) -> str:
    """One short line: which rank failed and how, or what failed in the controller."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        rank = min(failures)
        error, prefix = failures[rank], f"rank {rank}: "
    else:
        error, prefix = getattr(error, "controller_failure", error), ""
    text = f"{type(error).__name__}: {error}"
    line = next((line.strip() for line in text.splitlines() if line.strip()), text)
    return prefix + line.split(". ")[0][:160]


def lost_group(error: BaseException | None) -> str | None:
    """Why a phase's Ray Train run ended with a worker group lost in a way its controller does not retry, or None.

    A node that dies while its workers are being set up makes the controller's call on one of them raise (the actor
    is unavailable, or died); Ray Train (2.60) takes that for an error of its own and raises it under any
    FailureConfig. For the run it is a lost worker group like any other, so the coordinator restarts the phase."""
    if isinstance(error, ControllerError) and isinstance(error.controller_failure, RayActorError):
        return cause(error)
    return None
