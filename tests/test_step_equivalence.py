"""The production step computes what the step written the obvious way computes; bf16 runs and stays close."""

from __future__ import annotations

import pytest
import torch

from service.spec import SpecError, parse_spec
from workers.checkpoint import fresh_state
from workers.losses import make_loss
from workers.networks import Discriminator
from workers.plain_step import plain_state, plain_step
from workers.step import train_step

SPEC_YAML = "run: r\ndataset: d\nstorage: s\nresolution: 8\nlatent_size: 16\nfmap_base: 64\nfmap_max: 16\n"
SPEC = parse_spec(SPEC_YAML)


def run_steps(step, res: int, fading: bool, spec=SPEC, steps: int = 3):
    """`steps` steps from seed 0 on a fixed batch of 8: the losses of each, and every weight and Adam moment."""
    torch.manual_seed(0)
    state = fresh_state(spec, 1, res, 0.001, torch.device("cpu"))
    if step is plain_step:
        state = plain_state(state)
    reals = torch.rand(8, 3, res, res) * 2 - 1
    losses = [torch.stack(step(state, make_loss("wgan-gp"), reals, 0.5, fading, spec, 1)[:3]) for _ in range(steps)]
    tensors = [t.detach().clone() for m in (state.G, state.D, state.G_ema) for t in m.parameters()]
    for opt in (state.opt_G, state.opt_D):
        tensors += [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    return torch.stack(losses), tensors


@pytest.mark.parametrize("res, fading", [(4, False), (8, True)])
def test_three_fast_steps_equal_three_plain_steps_in_float64(res, fading):
    """In float64 rounding cannot hide a change of math: stacking reals and fakes, channels_last, foreach Adam
    and the foreach EMA must give the plain step's losses, penalties, weights and Adam moments."""
    torch.set_default_dtype(torch.float64)
    try:
        want_losses, want = run_steps(plain_step, res, fading)
        got_losses, got = run_steps(train_step, res, fading)
    finally:
        torch.set_default_dtype(torch.float32)
    assert want_losses[:, 2].gt(0).all()  # the penalty is taken on every D step
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-10, atol=1e-12)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_three_fast_steps_match_plain_steps_in_float32():
    """The same in float32, where the fast step runs oneDNN's channels_last kernels: equal up to rounding."""
    want_losses, want = run_steps(plain_step, 8, True)
    got_losses, got = run_steps(train_step, 8, True)
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-4, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)


def test_stacked_sets_score_as_separate_forwards_and_never_mix():
    torch.manual_seed(0)
    D = Discriminator(8, 3, 64, 16)
    reals, fakes = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)
    stacked = D(torch.cat([reals, fakes]), 0.5, sets=2)
    torch.testing.assert_close(stacked, torch.cat([D(reals, 0.5), D(fakes, 0.5)]))
    changed = D(torch.cat([reals, fakes * 3]), 0.5, sets=2)
    assert torch.equal(changed[:8], stacked[:8])  # the reals' minibatch-stddev groups hold no fake
    assert not torch.equal(changed[8:], stacked[8:])


def test_a_bf16_step_runs_and_its_losses_are_close_to_fp32():
    bf16 = parse_spec(SPEC_YAML + "precision: bf16\n")
    fp32_losses, fp32 = run_steps(train_step, 8, True, steps=1)
    bf16_losses, bf16_tensors = run_steps(train_step, 8, True, spec=bf16, steps=1)
    assert all(t.dtype == torch.float32 for t in bf16_tensors)  # weights and Adam stay fp32
    torch.testing.assert_close(bf16_losses, fp32_losses, rtol=0.05, atol=0.05)
    assert any(not torch.equal(a, b) for a, b in zip(bf16_tensors, fp32))  # bf16 did run: not bit-identical


def test_precision_is_validated_and_left_out_of_the_model_hash():
    assert SPEC.precision == "fp32"
    assert parse_spec(SPEC_YAML + "precision: bf16\n").model_hash() == SPEC.model_hash()
    with pytest.raises(SpecError, match=r"^spec: precision: .*'fp32' or 'bf16'"):
        parse_spec(SPEC_YAML + "precision: fp16\n")
