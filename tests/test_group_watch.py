"""Which ends of a phase's Ray Train run the coordinator takes for a lost worker group and starts again.

The errors are Ray's own classes, built as Ray Train (2.60) hands them to `fit()`'s caller: a controller whose call
on a worker actor failed because the worker's node died while the group started (seen in the chaos campaign's
node trials as `ControllerError: … The actor … is unavailable: RpcError … Socket closed`).
"""

from __future__ import annotations

from ray.exceptions import ActorDiedError, ActorUnavailableError
from ray.train import ControllerError

from service.group_watch import lost_group

ACTOR = b"\x01" * 16


def test_a_controller_error_over_an_unreachable_or_dead_worker_is_a_lost_group():
    unavailable = ControllerError(ActorUnavailableError(
        "The actor is temporarily unavailable: RpcError: RPC error: Socket closed rpc_code: 14. The task may or may "
        "not have been executed on the actor.", ACTOR))
    assert lost_group(unavailable).startswith("ActorUnavailableError: The actor ")
    assert "Socket closed" in lost_group(unavailable)
    assert lost_group(ControllerError(ActorDiedError())).startswith("ActorDiedError: ")


def test_any_other_end_is_not():
    assert lost_group(None) is None
    assert lost_group(ControllerError(ValueError("a callback failed"))) is None
    assert lost_group(RuntimeError("a worker raised")) is None
