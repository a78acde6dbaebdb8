"""Test-only fault hooks, read from the environment of `progan train` (README, "Failure handling").

PROGAN_FAULT_NONFINITE="phase=1,step=3,count=5[,passes=1]" puts a NaN into rank 0's batch of reals at steps
3…7 of phase 1 (steps counted from the phase's start, 0-based, by the images it has seen), on the first
`passes` passes over those steps: a rollback starts a new pass. The value is checked before anything is
written; one that does not parse is refused naming the variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

NONFINITE_FAULT = "PROGAN_FAULT_NONFINITE"


@dataclass(frozen=True)
class NonFiniteFault:
    phase: int
    step: int
    count: int
    passes: int = 1

    def poisons(self, phase: int, step: int, rollbacks: int) -> bool:
        return phase == self.phase and rollbacks < self.passes and self.step <= step < self.step + self.count


def nonfinite_fault(text: str | None) -> NonFiniteFault | None:
    """The fault a PROGAN_FAULT_NONFINITE value asks for (None for none), or ValueError naming the variable."""
    if text is None or not text.strip():
        return None
    fields = {}
    for part in text.split(","):
        key, eq, value = part.strip().partition("=")
        if not eq or key not in ("phase", "step", "count", "passes") or key in fields:
            raise ValueError(f"{NONFINITE_FAULT}={text!r}: expected phase=N,step=N,count=N[,passes=N], "
                             f"got {part.strip()!r}")
        if not value.isdigit():
            raise ValueError(f"{NONFINITE_FAULT}={text!r}: {key} must be a whole number, got {value!r}")
        fields[key] = int(value)
    missing = [k for k in ("phase", "step", "count") if k not in fields]
    if missing:
        raise ValueError(f"{NONFINITE_FAULT}={text!r}: {', '.join(missing)} missing")
    if fields["count"] < 1 or fields.get("passes", 1) < 1:
        raise ValueError(f"{NONFINITE_FAULT}={text!r}: count and passes must be at least 1")
    return NonFiniteFault(**fields)


def nonfinite_fault_from_env() -> NonFiniteFault | None:
    return nonfinite_fault(os.environ.get(NONFINITE_FAULT))
