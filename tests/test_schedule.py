"""The growth schedule and the run's state machine, tested as pure functions."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.schedule import (
    Fail, IllegalTransition, PhaseCommitted, PhaseRecord, RollBack, RunState, Start, Status, Stop, WorkersRestarted,
    build_schedule, extend_to_total, new_run, transition,
)
from service.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]

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


def test_total_kimg_defaults_to_the_schedule():
    assert SPEC.total_kimg == 10  # 2 + 1 + 1 + 1 + 1 + 1 + 3: today's schedule, unchanged
    assert sum(p.images for p in build_schedule(SPEC)) == 10016  # each phase rounded up to whole batches


def test_total_kimg_extends_the_final_stable_phase():
    spec = SPEC.model_copy(update={"total_kimg": 15.0})
    phases = build_schedule(spec)
    assert [p.images for p in phases] == [2000, 1008, 1008, 1000, 1000, 1000, 7984]
    assert sum(p.images for p in phases) == 15000  # the run's image target (progan_run_images_target)
    assert phases[:-1] == build_schedule(SPEC)[:-1]
    # a total between two batch boundaries is reached with the final phase's whole batches
    assert sum(p.images for p in build_schedule(SPEC.model_copy(update={"total_kimg": 15.001}))) == 15008


def test_extend_to_total_is_pure_and_never_shortens():
    phases = build_schedule(SPEC)
    assert extend_to_total(phases, 0) == phases
    assert extend_to_total(phases, 10016) == phases
    longer = extend_to_total(phases, 10017)
    assert longer[-1].images == 3008 and longer[:-1] == phases[:-1]


def test_total_kimg_validation():
    base = "run: r\ndataset: d\nstorage: s\nresolution: 8\nfade_kimg: 1\nstable_kimg: 2\n"
    assert parse_spec(base + "total_kimg: 5\n").total_kimg == 5  # exactly the schedule is fine
    for bad in ("total_kimg: 4.5\n", "total_kimg: 0\n", "total_kimg: -3\n"):
        with pytest.raises(SpecError, match="job.yaml: total_kimg: "):
            parse_spec(base + bad, "job.yaml")
    with pytest.raises(SpecError, match="4.5 is less than the schedule's 5 kimg"):
        parse_spec(base + "total_kimg: 4.5\n")
    assert parse_spec(base + "total_kimg: 6\n").model_hash() != parse_spec(base).model_hash()
    assert parse_spec(base + "total_kimg: 5\n").model_hash() == parse_spec(base).model_hash()


def test_plan_of_the_1024_preset_reaches_the_reference_12000_kimg():
    spec = load_spec(ROOT / "configs/celeba-hq-1024-8gpu.yaml")
    result = CliRunner().invoke(app, ["plan", str(ROOT / "configs/celeba-hq-1024-8gpu.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    phases = json.loads(result.output)["phases"]
    assert sum(p["images"] for p in phases) == 12_000_000 == sum(p.images for p in build_schedule(spec))
    assert [(p["resolution"], p["kind"]) for p in phases[-2:]] == [(1024, "fade"), (1024, "stable")]
    assert phases[-2]["images"] == 600_000
    # 1024² stable: 2400 kimg (12000 - 600 - 8 x 1200) less the 320 images by which 4²…16² round up to
    # whole batches of 512, 256 and 128 (600.064 kimg each), so that the run shows exactly 12000 kimg
    assert phases[-1]["images"] == 2_400_000 - 5 * 64
    text = CliRunner().invoke(app, ["plan", str(ROOT / "configs/celeba-hq-1024-8gpu.yaml")], env={"COLUMNS": "120"})
    assert "total: 12000 kimg" in text.output and "2399.68" in text.output


def test_default_lr_is_the_reference_one_gpu_preset():
    """preset-v2-1gpu, whose minibatch table is the default here: 0.001, and 0.0015 at 1024²."""
    phases = build_schedule(parse_spec("run: r\ndataset: d\nstorage: s\nresolution: 1024\n"))
    assert {(p.resolution, p.lr, p.batch) for p in phases if p.resolution >= 256} == {
        (256, 0.001, 8), (512, 0.001, 4), (1024, 0.0015, 4)}
    assert all(p.lr == 0.001 for p in phases if p.resolution < 1024)
    assert parse_spec("run: r\ndataset: d\nstorage: s\nresolution: 1024\nlr: 0.002\n").lr[1024] == 0.002


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
