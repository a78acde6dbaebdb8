"""The train step's contract: a non-finite loss or gradient on any rank skips the update on every rank."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from service.spec import parse_spec
from workers.checkpoint import fresh_state
from workers.step import reduce_grads, train_step
from workers.losses import make_loss
from tests.conftest import ROOT

SPEC = parse_spec("run: r\ndataset: d\nstorage: s\nresolution: 8\nlatent_size: 16\nfmap_base: 32\nfmap_max: 16\n")


def weights(state) -> list[torch.Tensor]:
    return [p.detach().clone() for m in (state.G, state.D, state.G_ema) for p in m.parameters()]


def test_a_finite_step_updates_and_a_nan_batch_is_skipped_whole():
    torch.manual_seed(0)
    state = fresh_state(SPEC, 1, 8, 0.001, torch.device("cpu"))
    loss = make_loss("wgan-gp")
    reals = torch.rand(4, 3, 8, 8) * 2 - 1
    before = weights(state)
    *_, finite = train_step(state, loss, reals, 0.5, True, SPEC, 1)
    assert finite
    assert any(not torch.equal(a, b) for a, b in zip(before, weights(state)))

    before, adam = weights(state), copy.deepcopy(state.opt_D.state_dict())
    poisoned = reals.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    d_loss, _, _, finite = train_step(state, loss, poisoned, 0.5, True, SPEC, 1)
    assert not finite and not torch.isfinite(d_loss)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(state)))  # G, D and G_ema untouched
    assert str(state.opt_D.state_dict()) == str(adam)  # Adam's moments untouched too


def rank_main(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    net = torch.nn.Linear(3, 1)
    x = torch.ones(2, 3)
    for poison in (None, 1):  # first a finite step on both ranks, then rank 1 alone goes non-finite
        net.zero_grad()
        out = net(x).sum() * (float("nan") if rank == poison else 1.0)
        out.backward()
        results[(rank, poison)] = (reduce_grads(net, out, 2), net.weight.grad.clone())
    dist.destroy_process_group()


def test_all_ranks_agree_in_the_one_all_reduce():
    from tests.conftest import free_port

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(free_port(), results), nprocs=2)
        results = dict(results)
    assert results[(0, None)][0] and results[(1, None)][0]
    assert torch.equal(results[(0, None)][1], results[(1, None)][1])
    assert results[(0, 1)][0] is False and results[(1, 1)][0] is False  # rank 0 was finite, and still skips


@pytest.mark.parametrize("world", [1])
def test_reduce_grads_keeps_a_single_rank_gradient(world):
    net = torch.nn.Linear(2, 1)
    net(torch.ones(1, 2)).sum().backward()
    grad = net.weight.grad.clone()
    assert reduce_grads(net, torch.tensor(1.0), world)
    assert torch.equal(net.weight.grad, grad)


FAULTS_OF_REUSED_BLOCKS = """
import resource, sys, torch
from workers.step import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()

def step():  # a step's memory: 3 blocks of 48 MiB held, then freed
    blocks = [torch.empty(12 << 20).fill_(1) for _ in range(3)]
    del blocks

step()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_a_training_process_keeps_freed_step_memory_instead_of_faulting_it_in_again():
    """20 steps that each hold 144 MiB and free it. glibc's default policy maps a block above 32 MiB afresh each
    time and faults its pages in (20 × 36 864); with keep_freed_memory the heap keeps the memory for the next step.
    (Smaller blocks fault too in a real step, as the default thresholds adapt: bench/step_bench.py --malloc.)"""
    faults = {}
    for policy in ("default", "keep"):
        r = subprocess.run([sys.executable, "-c", FAULTS_OF_REUSED_BLOCKS, policy], capture_output=True, text=True,
                           check=True, cwd=ROOT)
        faults[policy] = int(r.stdout.split()[-1])
    assert faults["keep"] < 150_000 < 600_000 < faults["default"], faults  # 737 280: every block faults in
