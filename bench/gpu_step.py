"""GPU fast path: img/s and achieved TFLOP/s of the production train step with the paper's full-size networks.

    python bench/gpu_step.py [--res 128 256 1024] [--precision bf16 fp32] [--json]
    python bench/gpu_step.py --device cpu --res 8 16 --batch 4 --latent 32 --fmap-max 32 --steps 2   # smoke run

The step is `workers.step.train_step` (one D step with the WGAN-GP penalty's double backward, one G step, the
EMA) on nets grown to r in the middle of a fade (α 0.5), the batch of the reference's single-GPU preset at r
unless `--batch` says otherwise; reals are made once on the device. FLOPs are counted over one whole step with
torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions, the double backward's included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.spec import DEFAULT_LR, DEFAULT_MINIBATCH, Spec  # noqa: E402
from workers.checkpoint import fresh_state  # noqa: E402
from workers.losses import make_loss  # noqa: E402
from workers.step import train_step  # noqa: E402


class GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker, whose hooks refuse the penalty's autograd.grad with
    respect to a leaf input; the count is the same, only not broken down by module."""

    parents = {"Global"}

    def __enter__(self) -> GlobalOnly:
        return self

    def __exit__(self, *exc) -> None:
        return None


def step_flops(step) -> int:
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = GlobalOnly()
    with counter:
        step()
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, res: int, precision: str, device: torch.device) -> dict:
    batch = args.batch or DEFAULT_MINIBATCH[res]
    spec = Spec.model_validate({
        "run": "bench", "dataset": "bench", "storage": "bench", "resolution": max(res, 8),
        "latent_size": args.latent, "fmap_base": args.fmap_base, "fmap_max": args.fmap_max, "minibatch": batch,
        "precision": precision,
    })  # fmt: skip
    torch.manual_seed(0)
    state = fresh_state(spec, 0, res, DEFAULT_LR[res], device)
    loss = make_loss(spec.loss)
    reals = torch.rand(batch, spec.channels, res, res, device=device) * 2 - 1

    def step() -> None:
        train_step(state, loss, reals, 0.5, True, spec, 1)

    flops = step_flops(step)
    for _ in range(args.warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "res": res, "precision": precision, "device": str(device), "batch": batch,
        "img_per_s": round(args.steps * batch / seconds, 2), "tflop_per_step": float(f"{flops / 1e12:.4g}"),
        "tflop_per_s": float(f"{args.steps * flops / seconds / 1e12:.4g}"),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", type=int, nargs="+", default=[128, 256, 1024])
    parser.add_argument("--precision", choices=["fp32", "bf16"], nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=0, help="images a step; 0: the preset's for the resolution")
    parser.add_argument("--latent", type=int, default=512)
    parser.add_argument("--fmap-base", type=int, default=8192)
    parser.add_argument("--fmap-max", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one JSON object a line")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
        torch.backends.cudnn.benchmark = True

    for res in args.res:
        for precision in args.precision:
            row = measure(args, res, precision, device)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{res:>5}²  {precision}  {row['device']}  batch {row['batch']:>3}  {row['img_per_s']:9.2f} img/s"
                      f"  {row['tflop_per_step']:9.4g} TFLOP/step  {row['tflop_per_s']:9.4g} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
