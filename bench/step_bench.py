"""Training-step throughput: the step alone in one process (no loader, no Ray), in img/s.

    python bench/step_bench.py [--res 4 8 16 32] [--nets small full] [--step fast plain] [--malloc keep|default]
                               [--json]

"cpu-bench-32" (`--nets small`): RGB, latent 64, 64 feature maps at every resolution in G and D, global batch
32, WGAN-GP (λ 10, drift 0.001, penalty at the phase's own resolution), Adam lr 0.001, β (0, 0.99), eps 1e-8,
EMA β 0.999 every step; nets grown to r and in the middle of a fade (α 0.5) at r ≥ 8, stable at 4; reals
`torch.rand * 2 - 1` made once; two torch threads. `--nets full` runs the paper's networks (latent 512,
fmap_base 8192, fmap_max 512) with `--full-batch` images a step. Each figure is the median of `--repeats`
timed repeats of at least `--seconds` each, after `--warmup` steps, in img/s of wall time and in img per second
of the process's CPU time (both threads), with the load average beside them.

`--step plain` times `workers.plain_step.plain_step`, the step written the obvious way that `train_step` is tested
against; give both (`--step fast plain`) and they alternate, resolution by resolution, so a before/after ratio
comes from one sitting even on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.spec import Spec  # noqa: E402
from workers.checkpoint import fresh_state  # noqa: E402
from workers.losses import make_loss  # noqa: E402
from workers.plain_step import plain_state, plain_step  # noqa: E402
from workers.step import keep_freed_memory, train_step  # noqa: E402

STEPS = {"fast": train_step, "plain": plain_step}
NETS = {  # latent, fmap_base, fmap_max
    "small": (64, 8192, 64),  # cpu-bench-32: 64 maps at every resolution
    "full": (512, 8192, 512),
}


def bench_spec(nets: str, res: int, batch: int) -> Spec:
    latent, fmap_base, fmap_max = NETS[nets]
    return Spec.model_validate({
        "run": "bench", "dataset": "bench", "storage": "bench", "resolution": max(res, 8), "latent_size": latent,
        "fmap_base": fmap_base, "fmap_max": fmap_max, "minibatch": batch, "lr": 0.001, "ema_beta": 0.999,
        "loss": "wgan-gp", "gp_scale": "local",
    })  # fmt: skip


def images_per_second(step, nets: str, res: int, batch: int, args) -> tuple[float, float]:
    """Median img/s of wall time, and of this process's CPU time (all its threads): on a busy machine the wall
    figure also measures everyone else's load, the CPU figure mostly the step's own work."""
    spec = bench_spec(nets, res, batch)
    torch.manual_seed(0)
    state = fresh_state(spec, 0, res, 0.001, torch.device("cpu"))
    if step is plain_step:
        state = plain_state(state)
    loss = make_loss(spec.loss)
    reals = torch.rand(batch, spec.channels, res, res) * 2 - 1
    alpha, fading = (1.0, False) if res == 4 else (0.5, True)
    for _ in range(args.warmup):
        step(state, loss, reals, alpha, fading, spec, 1)
    rates, cpu_rates = [], []
    for _ in range(args.repeats):
        start, cpu_start, steps = time.perf_counter(), time.process_time(), 0
        while steps == 0 or time.perf_counter() - start < args.seconds:
            step(state, loss, reals, alpha, fading, spec, 1)
            steps += 1
        rates.append(steps * batch / (time.perf_counter() - start))
        cpu_rates.append(steps * batch / (time.process_time() - cpu_start))
    return statistics.median(rates), statistics.median(cpu_rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", type=int, nargs="+", default=[4, 8, 16, 32], help="resolutions (64 too for full)")
    parser.add_argument("--nets", choices=NETS, nargs="+", default=["small", "full"])
    parser.add_argument("--step", choices=STEPS, nargs="+", default=["fast"])
    parser.add_argument("--batch", type=int, default=32, help="images a step for the small nets")
    parser.add_argument("--full-batch", type=int, default=8, help="images a step for the full-size nets")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="least time of one timed repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="one JSON object a line")
    parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                        help="keep: glibc keeps freed step memory, as a training worker has it "
                             "(workers.step.keep_freed_memory); default: glibc's own policy, for a before/after")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.malloc == "keep":
        keep_freed_memory()

    for nets in args.nets:
        batch = args.batch if nets == "small" else args.full_batch
        for res in args.res:
            for name in args.step:
                rate, cpu_rate = images_per_second(STEPS[name], nets, res, batch, args)
                if args.json:
                    print(json.dumps({"nets": nets, "res": res, "step": name, "batch": batch,
                                      "img_per_s": round(rate, 2), "img_per_cpu_s": round(cpu_rate, 2),
                                      "load1": os.getloadavg()[0]}), flush=True)
                else:
                    print(f"{nets:>5} {res:>4}²  {name:>5}  batch {batch:>3}  {rate:9.1f} img/s  "
                          f"{cpu_rate:9.1f} img/CPU-s  load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
