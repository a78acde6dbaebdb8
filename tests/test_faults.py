"""The pure parts of failure handling: the fault hook's parsing, the spec's new bounds, the state's counts."""

from __future__ import annotations

import pytest

from service.schedule import NonFiniteSteps, PhaseCommitted, PhaseRecord, RunState, Start, new_run, transition
from service.spec import SpecError, parse_spec
from workers.faults import NonFiniteFault, nonfinite_fault

BASE = "run: r\ndataset: d\nstorage: s\nresolution: 8\n"


def test_the_fault_hook_parses_and_poisons_only_its_steps_and_passes():
    assert nonfinite_fault(None) is None and nonfinite_fault("  ") is None
    fault = nonfinite_fault("phase=1,step=3,count=2")
    assert fault == NonFiniteFault(phase=1, step=3, count=2, passes=1)
    assert [s for s in range(8) if fault.poisons(1, s, 0)] == [3, 4]
    assert not fault.poisons(0, 3, 0) and not fault.poisons(1, 3, 1)
    assert nonfinite_fault("phase=0, step=0, count=1, passes=3").poisons(0, 0, 2)


@pytest.mark.parametrize("text, says", [
    ("phase=1", "step, count missing"),
    ("phase=1,step=x,count=1", "step must be a whole number, got 'x'"),
    ("phase=1,step=-1,count=1", "step must be a whole number"),
    ("phase=1,step=1,count=0", "count and passes must be at least 1"),
    ("phase=1,step=1,count=1,when=now", "expected phase=N,step=N,count=N[,passes=N], got 'when=now'"),
    ("phase=1,phase=2,step=1,count=1", "got 'phase=2'"),
    ("nan", "got 'nan'"),
])
def test_a_fault_hook_that_does_not_parse_is_refused_naming_the_variable(text, says):
    with pytest.raises(ValueError, match="PROGAN_FAULT_NONFINITE=") as e:
        nonfinite_fault(text)
    assert says in str(e.value)


@pytest.mark.parametrize("field, value, says", [
    ("nonfinite_rollback_steps", 0, "nonfinite_rollback_steps: Input should be greater than or equal to 1"),
    ("nonfinite_rollback_steps", 10**6, "nonfinite_rollback_steps: Input should be less than or equal to 10000"),
    ("max_rollbacks", -1, "max_rollbacks: Input should be greater than or equal to 0"),
    ("max_rollbacks", 101, "max_rollbacks: Input should be less than or equal to 100"),
    ("storage_options", "{retry_seconds: -1}", "storage_options.retry_seconds: Input should be greater than or equal to 0"),
    ("storage_options", "{retry_seconds: 7200}", "storage_options.retry_seconds: Input should be less than or equal"),
    ("storage_options", "{retry_seconds: .inf}", "storage_options.retry_seconds: Input should be"),
])
def test_the_new_spec_fields_are_bounded(field, value, says):
    with pytest.raises(SpecError, match="spec: ") as e:
        parse_spec(BASE + f"{field}: {value}\n")
    assert says in str(e.value)


def test_the_new_spec_fields_default_and_leave_the_model_hash_alone():
    spec = parse_spec(BASE)
    assert (spec.nonfinite_rollback_steps, spec.max_rollbacks, spec.storage_options.retry_seconds) == (8, 3, 120.0)
    changed = parse_spec(BASE + "max_rollbacks: 0\nstorage_options: {retry_seconds: 5}\n")
    assert changed.model_hash() == spec.model_hash()  # a resumed run may change how it survives failures


def test_non_finite_counts_add_up_in_the_state_and_survive_its_json():
    state = transition(new_run(2), Start())
    state = transition(state, NonFiniteSteps(5, 1))
    state = transition(state, PhaseCommitted(PhaseRecord(0, "00-0004-stable", 16, 1.0, 2.0)))
    state = transition(state, NonFiniteSteps(2))
    assert (state.nonfinite_steps, state.rollbacks) == (7, 1)
    assert RunState.from_json(state.to_json()) == state
    legacy = state.to_json().replace('"nonfinite_steps": 7,', "").replace('"rollbacks": 1,', "")
    assert RunState.from_json(legacy).rollbacks == 0  # a state.json written before these fields still reads
