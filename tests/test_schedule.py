"""The growth schedule and the run's state machine, tested as pure functions."""

import pytest

from service.schedule import (
    Fail, IllegalTransition, PhaseCommitted, PhaseRecord, RollBack, RunState, Start, Status, Stop, WorkersRestarted,
    build_schedule, new_run, transition,
)
from service.spec import parse_spec

SPEC = parse_spec(
    "run: r\ndataset: d\nstorage: s\nresolution: 32\nminibatch: {4: 16, 8: 16, 16: 8, 32: 8}\n"
    "workers: {4: 2, 8: 2, 16: 1, 32: 2}\nfade_kimg: 1\nstable_kimg: {4: 2, 8: 1, 16: 1, 32: 3}\n"
    "lr: {32: 0.002}\n"
)


def test_phase_list_4_to_32():
    phases = build_schedule(SPEC)
    assert [(p.index, p.resolution, p.kind) for p in phases] == [
        (0, 4, "stable"), (1, 8, "fade"), (2, 8, "stable"), (3, 16, "fade"), (4, 16, "stable"),
        (5, 32, "fade"), (6, 32, "stable"),
    ]
    assert [p.name for p in phases][:2] == ["00-0004-stable", "01-0008-fade"]
    assert [p.images for p in phases] == [2000, 1008, 1008, 1000, 1000, 1000, 3000]  # whole global batches
    assert [p.batch_per_worker for p in phases] == [8, 8, 8, 8, 8, 4, 4]
    assert phases[6].lr == 0.002 and phases[0].lr == 0.001


def test_alpha_over_a_fade_and_in_stable():
    fade, stable = build_schedule(SPEC)[3], build_schedule(SPEC)[4]
    assert fade.alpha(0) == 0.0
    assert fade.alpha(500) == 0.5
    assert fade.alpha(1000) == 1.0 and fade.alpha(5000) == 1.0
    assert stable.alpha(0) == 1.0


def record(i):
    return PhaseCommitted(PhaseRecord(i, f"p{i}", 10, 1.5, 100.0 + i))


def test_a_run_walks_every_phase_to_finished():
    s = transition(new_run(3), Start())
    assert (s.status, s.phase) == (Status.RUNNING, 0)
    s = transition(transition(s, record(0)), record(1))
    assert (s.status, s.phase) == (Status.RUNNING, 2)
    s = transition(s, record(2))
    assert s.status is Status.FINISHED and [r.index for r in s.committed] == [0, 1, 2]


def test_stop_fail_and_start_again():
    s = transition(transition(new_run(3), Start()), record(0))
    stopped = transition(s, Stop())
    assert (stopped.status, stopped.phase) == (Status.STOPPED, 1)
    failed = transition(transition(stopped, Start()), Fail("boom"))
    assert (failed.status, failed.reason) == (Status.FAILED, "boom")
    again = transition(failed, Start())
    assert (again.status, again.phase, again.reason) == (Status.RUNNING, 1, None)
    assert transition(again, Start()).status is Status.RUNNING  # a new driver takes over a dead one's run
    assert transition(again, WorkersRestarted(2)).restarts == 2
    assert transition(new_run(1), Stop()).status is Status.STOPPED
    assert transition(new_run(1), Fail("x")).status is Status.FAILED


@pytest.mark.parametrize(
    "state, event",
    [
        (RunState(Status.PENDING, phase_count=2), record(0)),
        (RunState(Status.RUNNING, phase=1, phase_count=3), record(0)),  # not the running phase
        (RunState(Status.RUNNING, phase=1, phase_count=3), record(2)),
        (RunState(Status.STOPPED, phase_count=2), record(0)),
        (RunState(Status.STOPPED, phase_count=2), Stop()),
        (RunState(Status.FAILED, phase_count=2), Fail("again")),
        (RunState(Status.FAILED, phase_count=2), WorkersRestarted()),
        (RunState(Status.FINISHED, phase=1, phase_count=2), Start()),
        (RunState(Status.FINISHED, phase=1, phase_count=2), Stop()),
        (RunState(Status.FINISHED, phase=1, phase_count=2), Fail("x")),
        (RunState(Status.FINISHED, phase=1, phase_count=2), record(1)),
        (RunState(Status.PENDING, phase_count=2), WorkersRestarted()),
        (RunState(Status.RUNNING, phase=0, phase_count=2), RollBack(0)),  # nothing committed to roll back
        (RunState(Status.FINISHED, phase=1, phase_count=2), RollBack(0)),  # FINISHED is final
    ],
)
def test_illegal_transitions_raise(state, event):
    with pytest.raises(IllegalTransition):
        transition(state, event)


def test_state_json_round_trip():
    s = transition(transition(transition(new_run(5), Start()), record(0)), WorkersRestarted())
    s = transition(s, Fail("worker died: 'x'"))
    text = s.to_json()
    assert RunState.from_json(text) == s
    assert RunState.from_json(RunState.from_json(text).to_json()) == s


def test_roll_back_uncommits_the_bad_phase_and_every_later_one():
    s = transition(transition(transition(transition(new_run(5), Start()), record(0)), record(1)), record(2))
    stopped = transition(s, Stop())
    back = transition(stopped, RollBack(1))
    assert (back.status, back.phase, [r.index for r in back.committed]) == (Status.STOPPED, 1, [0])
    running = transition(s, RollBack(2))
    assert (running.status, running.phase, [r.index for r in running.committed]) == (Status.RUNNING, 2, [0, 1])
    assert transition(running, record(2)).phase == 3  # the phase commits again and the run goes on
    assert transition(s, RollBack(0)).committed == () and transition(s, RollBack(0)).phase == 0
    with pytest.raises(IllegalTransition):
        transition(s, RollBack(3))  # phase 3 is not committed


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"status": "RUNNING", "phase": 0, "phase_count": 5, "committed": [], "rest', "JSONDecodeError"),
        ("[]", "TypeError"),
        ('{"status": "DANCING", "phase": 0, "phase_count": 5, "committed": []}', "'DANCING' is not a valid Status"),
        ('{"status": "RUNNING", "phase": 99, "phase_count": 5, "committed": []}', "phase 99 is not one of"),
        ('{"status": "RUNNING", "phase": -1, "phase_count": 5, "committed": []}', "phase -1 is not one of"),
        ('{"status": "RUNNING", "phase": 2, "phase_count": 5, "committed": []}', "committed phases [] do not match"),
        ('{"status": "RUNNING", "phase": 0, "phase_count": 5, "committed": [], "colour": 1}', "TypeError"),
        ('{"status": "RUNNING", "phase": 1, "phase_count": 5, "committed": [{"index": 0}]}', "TypeError"),
    ],
)
def test_a_broken_state_json_is_a_value_error_naming_the_problem(text, problem):
    with pytest.raises(ValueError) as e:
        RunState.from_json(text)
    assert problem in str(e.value) and "\n" not in str(e.value)
