"""Does progressive growing reach a given quality sooner? Fashion-MNIST at 32², small networks, one CPU worker.

The paper's claim (Karras et al. 2018, sec. 2 and fig. 4) reproduced at small scale with the real components:
1. `progan prepare` Fashion-MNIST (1 channel, 32²) into a temporary folder;
2. the progressive run: `progan train` on a spec 4² → 32² (7 phases of --kimg each), one Ray Train worker
   (1 torch thread and 1 loader process: 2 cores) on a new local Ray instance that `progan train` starts;
3. the baseline: the same networks built at 32² from the start, trained in this process with the same
   `train_step` and `PhaseStream` (1 thread, 1 loader process) for the same wall time as the progressive run
   spent in its training steps: the sum over phases of last_step_at - first_step_at in state.json (Ray bring-up,
   commits and evaluations between phases are left out of both);
4. SWD (x1e3 per Laplacian level, 4 x 128 directions as in the paper) of --eval-images generated images of each
   generator (G_ema and the raw G) against a set of real images, beside the floor that two disjoint real sets
   of that size give. The real sets are read straight from disjoint shards of the prepared dataset. MS-SSIM
   diversity too.

Prints tables; run it as `python bench/quality.py` (about 20 minutes on 2 cores with the defaults).

`python bench/quality.py --experiment gp-scale` compares where the gradient penalty is taken (spec `gp_scale`):
`reference` (on the gradient w.r.t. the final 32² input, as the reference code does) against `local` (at each
phase's own resolution), before and after that change of default. Both train the same progressive schedule
4² → 32² with the same image budget and seeds, in this process with the code a Ray worker runs (the schedule,
the checkpoint growth between phases, `train_step`, `PhaseStream`, the loss with its penalty scale), without
Ray's bring-up per phase; each G_ema's SWD against real images is printed per seed and as mean ± spread
(half the range) over the seeds. With the defaults (2 kimg per phase, 3 seeds) it takes about 11 CPU-minutes
on one torch thread: a run of 14 kimg steps in about 100 s on a free core, and the whole comparison took 31
minutes of wall time where it was measured, a 2-core machine shared with other work.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.artifacts import generate, latents, swd_levels  # noqa: E402
from service.runstore import RunStore  # noqa: E402
from service.schedule import build_schedule  # noqa: E402
from service.spec import Spec, parse_spec  # noqa: E402
from workers.checkpoint import (TrainingState, fresh_state, load_generator, load_payload,  # noqa: E402
                                state_from_payload)
from workers.data import PhaseStream, read_manifest  # noqa: E402
from workers.evaluate import diversity_ms_ssim, quantize  # noqa: E402
from workers.step import train_step  # noqa: E402
from workers.losses import make_loss, penalty_grad_scale  # noqa: E402

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
PROGAN = str(Path(sys.executable).parent / "progan")
RES = 32
# The paper's G_ema beta of 0.999 a step averages over ~1000 steps: in a run of ~1300 steps that is mostly the
# weights of earlier phases (or of the initialisation), so here the EMA half-life is ~70 steps (~2 kimg).
EMA_BETA = 0.99
# One torch thread: on a shared 2-core box two OpenMP threads spin against each other and against the loader.
THREADS = 1


def spec_for(dataset: Path, storage: Path, kimg: float) -> dict:
    return {
        "run": "progressive", "dataset": str(dataset), "storage": str(storage), "resolution": RES, "channels": 1,
        "latent_size": 64, "fmap_base": 512, "fmap_max": 64, "minibatch": 32, "workers": 1,
        "cpus_per_worker": THREADS, "data_workers": 1, "fade_kimg": kimg, "stable_kimg": kimg,
        "checkpoint_kimg": 1000, "mirror": False, "metrics_port": 0, "metrics_linger_seconds": 0,
        "ema_beta": EMA_BETA,
        "eval": {"swd_images": 256, "sample_grid": 8},
    }  # fmt: skip


def read_reals(dataset: Path, shards: list, n: int) -> torch.Tensor:
    """n uint8 NCHW images from these shards in stored order (the dataset is shuffled when prepared)."""
    images: list[np.ndarray] = []
    for shard in shards:
        with tarfile.open(dataset / shard.name) as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read()))))
        if len(images) >= n:
            break
    if len(images) < n:
        raise SystemExit(f"{dataset}: these shards hold {len(images)} images, {n} are needed")
    return torch.from_numpy(np.stack(images[:n]))[:, None]


def train_baseline(spec: Spec, seconds: float, seed: int) -> tuple[TrainingState, int, float]:
    """The 32² networks trained from scratch for `seconds` of stepping; returns (state, images, seconds)."""
    torch.manual_seed(seed)
    state = fresh_state(spec, 0, RES, spec.lr[RES], torch.device("cpu"))
    loss = make_loss(spec.loss)
    stream = PhaseStream(spec.dataset, RES, spec.minibatch[RES], rank=0, world_size=1, seed=seed, mirror=False,
                         num_workers=spec.data_workers)
    batches = iter(stream)
    images, first = 0, None
    while first is None or time.time() - first < seconds:
        train_step(state, loss, next(batches), 1.0, False, spec, 1)
        first = first or time.time()  # the clock starts after the first step, as first_step_at does
        images += spec.minibatch[RES]
    return state, images, time.time() - first


def train_progressive_here(spec: Spec, seed: int) -> tuple[TrainingState, float]:
    """Every phase of the schedule as a Ray worker trains it, in this process; returns (state, stepping s)."""
    state, total, stepping = None, 0, 0.0
    for phase in build_schedule(spec):
        torch.manual_seed(seed * 1000 + phase.index)
        if state is None:
            state = fresh_state(spec, phase.index, phase.resolution, phase.lr, torch.device("cpu"))
        else:
            state = state_from_payload(load_payload(state.to_bytes()), spec, phase.index, phase.resolution,
                                       phase.lr, total, torch.device("cpu"))
        loss = make_loss(spec.loss, penalty_grad_scale(spec.gp_scale, phase.resolution, spec.resolution))
        batches = iter(PhaseStream(spec.dataset, phase.resolution, phase.batch, rank=0, world_size=1,
                                   seed=seed * 1000 + phase.index, mirror=False, num_workers=spec.data_workers))
        start = time.time()
        while state.phase_images < phase.images:
            train_step(state, loss, next(batches), phase.alpha(state.phase_images), phase.fading, spec, 1)
            state.phase_images += phase.batch
        stepping += time.time() - start
        batches.close()
        total += phase.images
    return state, stepping


def gp_scale_experiment(args: argparse.Namespace, dataset: Path, work: Path) -> None:
    """gp_scale reference vs local: the same budget and seeds, SWD of G_ema per seed and mean ± spread."""
    seeds = range(args.seeds)
    n = args.eval_images
    manifest = read_manifest(str(dataset))
    reals = read_reals(dataset, manifest.shards[RES], n)
    budget = None
    results: dict[str, list[dict]] = {}
    for gp_scale in ("local", "reference"):  # before and after the change of default
        results[gp_scale] = []
        for seed in seeds:
            raw = {**spec_for(dataset, work / "runs", args.kimg), "gp_scale": gp_scale, "seed": seed,
                   "data_workers": 0}
            spec = parse_spec(yaml.safe_dump(raw))
            budget = f"{sum(p.images for p in build_schedule(spec)) / 1000:g} kimg (4²…32²)"
            state, stepping = train_progressive_here(spec, seed)
            swd = swd_levels(reals, quantize(generate(state.G_ema.eval(), latents(n, spec.latent_size, 12345))))
            results[gp_scale].append(swd)
            print(f"  gp_scale {gp_scale:<9} seed {seed}: SWD avg {swd['avg']:6.1f}  ({stepping:.0f} s stepping)",
                  flush=True)

    print(f"\nSWD x1e3 of G_ema against {n} real images (4 x 128 directions), {budget} per run, "
          f"seeds {', '.join(map(str, seeds))}: mean ± half the range over seeds")
    print(f"{'gp_scale':<22} {'32²':>15} {'16²':>15} {'avg':>15}")
    for gp_scale, runs in results.items():
        cells = []
        for level in ("32", "16", "avg"):
            values = np.array([r[level] for r in runs])
            cells.append(f"{values.mean():7.1f} ± {(values.max() - values.min()) / 2:5.1f}")
        label = f"{gp_scale} ({'before' if gp_scale == 'local' else 'after'})"
        print(f"{label:<22} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15}", flush=True)


def quality(G: torch.nn.Module, spec: Spec, reference: torch.Tensor, n: int) -> dict:
    fakes = quantize(generate(G, latents(n, spec.latent_size, 12345)))
    return {"swd": swd_levels(reference, fakes), "ms_ssim": diversity_ms_ssim(fakes, pairs=2000, seed=1)}


def row(name: str, swd: dict, ms: float, extra: str = "") -> str:
    return f"{name:<26} {swd['32']:>8.1f} {swd['16']:>8.1f} {swd['avg']:>8.1f} {ms:>9.4f}  {extra}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", choices=["growth", "gp-scale"], default="growth",
                   help="progressive vs non-progressive, or the gradient penalty's gp_scale reference vs local")
    p.add_argument("--kimg", type=float, default=None,
                   help="thousands of images per phase, 7 phases (default 5 for growth, 2 for gp-scale)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per gp_scale (gp-scale)")
    p.add_argument("--eval-images", type=int, default=1024, help="images per set for SWD")
    p.add_argument("--limit", type=int, default=20000, help="Fashion-MNIST images to prepare")
    p.add_argument("--workdir", type=Path, default=None, help="keep the dataset and run here (default: a temp dir)")
    args = p.parse_args()
    torch.set_num_threads(THREADS)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="progan-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    dataset, runs = work / "fashion-mnist-32", work / "runs"

    started = time.time()
    if not (dataset / "dataset.json").exists():
        subprocess.run([PROGAN, "prepare", str(FASHION_MNIST), str(dataset), "--resolution", str(RES),
                        "--channels", "1", "--limit", str(args.limit), "--shard-size", "1000"],
                       check=True, capture_output=True)  # fmt: skip
    print(f"prepared {dataset} in {time.time() - started:.0f} s", flush=True)
    if args.experiment == "gp-scale":
        args.kimg = args.kimg or 2.0
        gp_scale_experiment(args, dataset, work)
        print(f"\ntotal {time.time() - started:.0f} s; dataset in {work}")
        return
    args.kimg = args.kimg or 5.0

    spec_path = work / "progressive.yaml"
    spec_path.write_text(yaml.safe_dump(spec_for(dataset, runs, args.kimg)))
    spec = parse_spec(spec_path.read_text())
    phases = build_schedule(spec)
    print(f"progressive: {len(phases)} phases, {sum(p.images for p in phases) / 1000:g} kimg", flush=True)
    t0 = time.time()
    # A Ray instance of its own even where RAY_ADDRESS names a cluster: the figures are for this machine
    result = subprocess.run([PROGAN, "train", str(spec_path), "--new-run", "--address", "local"], capture_output=True,
                            text=True)
    progressive_wall = time.time() - t0
    if result.returncode != 0:
        raise SystemExit(f"progan train failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                         f"{result.stderr[-3000:]}")
    store = RunStore(spec.run_url)
    records = store.read_state().committed
    stepping = sum(r.last_step_at - r.first_step_at for r in records)
    print(f"progressive: {progressive_wall:.0f} s wall, {stepping:.0f} s in training steps", flush=True)

    payload = load_payload(store.read_checkpoint(phases[-1], spec))
    base, base_images, base_seconds = train_baseline(spec, stepping, seed=spec.seed)
    print(f"baseline: {base_images / 1000:g} kimg at 32² in {base_seconds:.0f} s", flush=True)

    manifest = read_manifest(str(dataset))
    shards = manifest.shards[RES]
    n = args.eval_images
    half = len(shards) // 2
    reference, other = read_reals(dataset, shards[:half], n), read_reals(dataset, shards[half:], n)
    floor = {"swd": swd_levels(reference, other), "ms_ssim": diversity_ms_ssim(other, pairs=2000, seed=1)}
    generators = {
        "progressive G_ema": load_generator(payload, spec, ema=True),
        "progressive G": load_generator(payload, spec, ema=False),
        "baseline G_ema": base.G_ema.eval(),
        "baseline G": base.G.eval(),
    }
    budgets = {"progressive": f"{sum(p.images for p in phases) / 1000:g} kimg (4²…32²), {stepping:.0f} s stepping",
               "baseline": f"{base_images / 1000:g} kimg (32²), {base_seconds:.0f} s stepping"}

    print(f"\nSWD x1e3 against {n} real images (4 x 128 directions); MS-SSIM over 2000 random pairs")
    print(f"{'':<26} {'32²':>8} {'16²':>8} {'avg':>8} {'MS-SSIM':>9}")
    print(row("real vs real (floor)", floor["swd"], floor["ms_ssim"], "disjoint shards"), flush=True)
    for name, G in generators.items():
        q = quality(G, spec, reference, n)
        print(row(name, q["swd"], q["ms_ssim"], budgets[name.split()[0]]), flush=True)

    print("\nper-phase SWD at the phase switch (256 images, 128 directions) and stepping time")
    for r, phase in zip(records, phases):
        path = store.layout.evaluation(phase)
        swd = json.loads(store.fs.cat_file(path))["swd"]["avg"] if store.fs.exists(path) else float("nan")
        print(f"  {phase.name:<16} {r.last_step_at - r.first_step_at:>6.1f} s  {r.images_per_second:>7.0f} img/s  "
              f"SWD avg {swd:7.1f}")
    print(f"\ntotal {time.time() - started:.0f} s; dataset and run in {work}")


if __name__ == "__main__":
    main()
