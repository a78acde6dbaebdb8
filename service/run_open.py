"""Opening a run: everything `progan train` can refuse, done before Ray or torch is imported, so that bad input
costs one line in a fraction of a second (not the seconds those imports take) and nothing is written until all
of it has passed: the Ray address, the test-only fault hook, the dataset, the run store, and a stored run that
disagrees with the spec or whose latest commit does not verify."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from service.console import RunConsole
from service.runstore import RunStore, RunStoreError
from service.schedule import Phase, RollBack, RunState, Status, build_schedule, transition
from service.schedule import new_run as fresh_run_state
from service.spec import Spec
from workers.data import check_dataset, read_manifest
from workers.faults import NonFiniteFault, nonfinite_fault_from_env


class CoordinatorError(RuntimeError):
    """A problem found before training starts: unreachable cluster, bad dataset, unwritable store."""


@dataclass(frozen=True)
class OpenedRun:
    spec: Spec
    store: RunStore
    phases: list[Phase]
    state: RunState  # where training goes on
    fault: NonFiniteFault | None  # the test-only fault hook, if set


def open_run(spec: Spec, *, new_run: bool, console: RunConsole, address: str | None = None) -> OpenedRun:
    """Check what the run needs, then create it (or take up the stored one): a resumed run starts only on a
    commit that verifies."""
    if address:
        check_ray_address(address)
    try:
        fault = nonfinite_fault_from_env()
    except ValueError as e:
        raise CoordinatorError(str(e)) from None
    store = RunStore(spec.run_url, spec.storage_options)
    phases = build_schedule(spec)
    preflight(spec, store, phases)
    if new_run:
        store.clear()
    if store.exists():
        store.refuse_changed_spec(spec)
        state = store.read_state()
        console.note(f"resuming {store.url}: {state.status.value}, phase {phases[state.phase].name}")
        state = verified_resume(spec, store, phases, state, console)
    else:
        state = fresh_run_state(len(phases))
        store.write_spec(spec)
        store.write_state(state)
    store.clear_stop_request()
    return OpenedRun(spec, store, phases, state, fault)


def check_ray_address(address: str) -> None:
    """Fail in seconds, not minutes, when the cluster is not there."""
    if address in ("auto", "local") or address.startswith("ray://") or address.startswith("http"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise CoordinatorError(f"cannot reach the Ray cluster at {address}: {e}") from None


def preflight(spec: Spec, store: RunStore, phases: list[Phase]) -> None:
    """Refuses at once, without the retries that carry a run through an outage: a store that does not answer
    before training starts is a wrong address or a server that is not up."""
    manifest = read_manifest(spec.dataset, spec.storage_options.model_copy(update={"retry_seconds": 0}))
    for res in sorted({p.resolution for p in phases}):
        check_dataset(manifest, res, spec.channels, spec.dataset)
    try:
        store.check_writable()
    except RunStoreError as e:
        raise CoordinatorError(str(e)) from None


def verified_resume(spec: Spec, store: RunStore, phases: list[Phase], state: RunState,
                    console: RunConsole) -> RunState:
    """When the commit the current phase starts from fails (torn, flipped bytes, another spec), move it aside,
    roll back and train that phase again from the commit before it."""
    if state.status is Status.FINISHED or state.phase == 0:
        return state
    bad = phases[state.phase - 1]
    failure = store.commit_failure(bad, spec)
    if failure is None:
        return state
    before = phases[bad.index - 1] if bad.index else None
    if before is not None and (earlier := store.commit_failure(before, spec)):
        raise CoordinatorError(f"{failure}; the commit before it fails too ({earlier}): no good commit to "
                               f"train from, start over with --new-run")
    moved = store.set_aside(phases[bad.index:])
    console.note(f"{failure}: retraining phase {bad.name} from {before.name if before else 'scratch'} "
                 f"(its files are moved to {moved})")
    state = transition(state, RollBack(bad.index))
    store.write_state(state)
    return state
