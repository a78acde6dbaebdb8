"""Phase-switch time and training throughput through Ray, against the same loop in one plain process.

    python bench/phase_overhead.py [--kimg 0.8] [--workers 1 2]
    python bench/phase_overhead.py --quickstart

For each worker count it trains the quickstart networks 4² → 32² through the real coordinator on a local Ray
cluster and reads state.json. The switch time is what changing phases costs the run: the idle time from the end
of one phase's last training step to the start of the next phase's first step (final checkpoint, teardown,
commit, release, state restore; the sample grid and SWD run beside the next phase), plus what that first step
takes beyond a steady step of its phase (warm-up of new layers and shapes). The time to the end of the first
step, which counts the whole step, is printed beside it. The plain process runs `workers.step.train_step` on
the same data stream with no Ray at all.

--quickstart trains configs/quickstart.yaml itself (its phases, checkpoints, evaluation and 2 workers; only
where the data and the run go are changed) on the data `make demo` prepares, and prints its median switch and
the `progan train` wall time, which is `make demo`'s minus the few seconds of `progan prepare`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.schedule import build_schedule  # noqa: E402
from service.spec import parse_spec  # noqa: E402
from workers.checkpoint import fresh_state  # noqa: E402
from workers.data import PhaseStream  # noqa: E402
from workers.losses import make_loss  # noqa: E402
from workers.step import train_step  # noqa: E402


def spec_text(data: Path, runs: Path, workers: int, kimg: float) -> str:
    base = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    base.update(run=f"bench-{workers}w", dataset=str(data), storage=str(runs), workers=workers, fade_kimg=kimg,
                stable_kimg=kimg, checkpoint_kimg=kimg, metrics_port=0, metrics_linger_seconds=0,
                eval={"swd_images": 0, "sample_grid": 4})
    return yaml.safe_dump(base)


def quickstart_text(data: Path, runs: Path) -> str:
    base = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    base.update(run=f"bench-{base['workers']}w", dataset=str(data), storage=str(runs), metrics_port=0,
                metrics_linger_seconds=0)
    return yaml.safe_dump(base)


def through_ray(data: Path, runs: Path, workers: int, kimg: float, text: str | None = None) -> dict:
    spec_path = runs / f"bench-{workers}w.yaml"
    spec_path.write_text(text or spec_text(data, runs, workers, kimg))
    started = time.time()
    run = subprocess.run([sys.executable, "-m", "service.cli", "train", str(spec_path), "--new-run"],
                         capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"training with {workers} worker(s) failed:\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
    wall = time.time() - started
    state = json.loads((runs / f"bench-{workers}w" / "state.json").read_text())
    phases = state["committed"]
    pairs = list(zip(phases, phases[1:]))
    # idle: no step runs, from the last step's end to the next phase's first step's start; the first step itself
    # pays for warm-up (new layers, new shapes), so what it takes beyond a steady step counts to the switch too
    idle = [b["first_step_started_at"] - a["last_step_at"] for a, b in pairs]
    batch = {p.index: p.batch for p in build_schedule(parse_spec(spec_path.read_text()))}
    steady = {r["index"]: batch[r["index"]] / r["images_per_second"] for r in phases}  # one step at the phase's rate
    excess = [max(0.0, b["first_step_at"] - b["first_step_started_at"] - steady[b["index"]]) for _, b in pairs]
    return {
        "wall": wall, "phases": phases, "switches": [i + e for i, e in zip(idle, excess)], "idle": idle,
        "first_step_excess": excess,
        "to_first_step_end": [b["first_step_at"] - a["last_step_at"] for a, b in pairs],
        # the idle time's two halves: the phase's last step to its commit, that commit to the next first step
        "to_commit": [a["committed_at"] - a["last_step_at"] for a, _ in pairs],
        "from_commit": [b["first_step_started_at"] - a["committed_at"] for a, b in pairs],
    }


def plain_process(data: Path, spec_yaml: str, steps: int) -> dict[str, float]:
    """images/s of train_step in this process, per phase kind and resolution, after two warm-up steps."""
    spec = parse_spec(spec_yaml)
    loss = make_loss(spec.loss)
    out = {}
    for phase in build_schedule(spec):
        state = fresh_state(spec, phase.index, phase.resolution, phase.lr, torch.device("cpu"))
        stream = iter(PhaseStream(str(data), phase.resolution, phase.batch, 0, 1, 0, num_workers=spec.data_workers))
        for i in range(steps + 2):
            if i == 2:
                start = time.perf_counter()
            train_step(state, loss, next(stream), 0.5 if phase.fading else 1.0, phase.fading, spec, 1)
        out[phase.name] = steps * phase.batch / (time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kimg", type=float, default=0.8, help="thousands of images per phase")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--plain-steps", type=int, default=30)
    parser.add_argument("--quickstart", action="store_true", help="train configs/quickstart.yaml itself")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as each Ray worker gets one CPU
    if args.quickstart:
        return quickstart()

    with tempfile.TemporaryDirectory() as tmp:
        data, runs = Path(tmp, "data"), Path(tmp, "runs")
        runs.mkdir()
        subprocess.run([sys.executable, "-m", "service.cli", "prepare", "builtin", str(data), "--resolution", "32",
                        "--limit", "2000"], check=True, capture_output=True)
        plain = plain_process(data, spec_text(data, runs, 1, args.kimg), args.plain_steps)
        ray_runs = {w: through_ray(data, runs, w, args.kimg) for w in args.workers}

    print(f"\nphase switch (idle between two phases' steps + the first step's excess over a steady one), "
          f"{args.kimg} kimg phases")
    print(f"{'workers':>8} {'median s':>9} {'min s':>7} {'max s':>7} {'run wall s':>11}")
    for w, r in ray_runs.items():
        s = r["switches"]
        print(f"{w:>8} {statistics.median(s):9.2f} {min(s):7.2f} {max(s):7.2f} {r['wall']:11.1f}")
    print("\ntraining images/s per phase (global; Ray figures exclude each phase's first step)")
    header = f"{'phase':>16} {'plain':>8}" + "".join(f" {f'ray {w}w':>8}" for w in ray_runs)
    print(header)
    for i, name in enumerate(plain):
        row = f"{name:>16} {plain[name]:8.1f}"
        row += "".join(f" {r['phases'][i]['images_per_second']:8.1f}" for r in ray_runs.values())
        print(row)


def quickstart() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data, runs = Path(tmp, "data"), Path(tmp, "runs")
        runs.mkdir()
        subprocess.run([sys.executable, "-m", "service.cli", "prepare", "builtin", str(data), "--resolution", "32",
                        "--limit", "4000"], check=True, capture_output=True)
        load = os.getloadavg()
        r = through_ray(data, runs, 2, 0, quickstart_text(data, runs))
    s = r["switches"]
    print("\nquickstart (configs/quickstart.yaml, 2 workers): phase switch = idle + the first step's excess")
    print("  switches s: " + " ".join(f"{x:.2f}" for x in s))
    print("    idle (last step's end -> next first step's start) s: " + " ".join(f"{x:.2f}" for x in r["idle"]))
    print("      last step -> commit s: " + " ".join(f"{x:.2f}" for x in r["to_commit"]))
    print("      commit -> first step s: " + " ".join(f"{x:.2f}" for x in r["from_commit"]))
    print("    first step beyond a steady step s: " + " ".join(f"{x:.2f}" for x in r["first_step_excess"]))
    print("  to the first step's end s: " + " ".join(f"{x:.2f}" for x in r["to_first_step_end"])
          + f" (median {statistics.median(r['to_first_step_end']):.2f})")
    print(f"  median {statistics.median(s):.2f} s, min {min(s):.2f}, max {max(s):.2f}; progan train wall {r['wall']:.1f} s")
    print(f"  load average before / after: {load[0]:.2f} / {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
