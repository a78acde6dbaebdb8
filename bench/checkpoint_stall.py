"""How long an in-phase checkpoint holds up the training loop, before and after the checkpoint writer.

    python bench/checkpoint_stall.py [--res 128] [--repeats 3]

One Ray Train worker (a real TorchTrainer on a local Ray cluster, checkpoints persisted by `ray.train.report`
to a local storage folder) builds the full-size networks (latent 512, fmap_base 8192, fmap_max 512) grown to
--res, with Adam's moments (one optimizer step on zero gradients), and checkpoints them both ways:
- before: what the loop did up to now, on the training thread: serialize, write, `ray.train.report`;
- after: `CheckpointWriter.save`, the time until it returns to the loop (the copy into the kept snapshot),
  with the previous checkpoint already reported, as it is after a few thousand images of training; the
  writer thread's time until the report returned is printed beside it.
Figures are medians of --repeats checkpoints after a first one each (printed for the writer: it allocates the
snapshot that later checkpoints reuse).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import ray.train  # noqa: E402
import torch  # noqa: E402
from ray.train import RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

SPEC = "run: bench\ndataset: d\nstorage: s\nresolution: {res}\nlatent_size: 512\nfmap_base: 8192\nfmap_max: 512\n"


def worker(config: dict) -> None:
    from service.spec import parse_spec
    from workers.checkpoint import fresh_state
    from workers.checkpoint_writer import CHECKPOINT_FILE, CheckpointWriter

    torch.set_num_threads(2)
    spec = parse_spec(SPEC.format(res=config["res"]))
    state = fresh_state(spec, 0, config["res"], 0.001, torch.device("cpu"))
    for net, opt in ((state.G, state.opt_G), (state.D, state.opt_D)):
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    size = len(state.to_bytes())

    def synchronous() -> float:
        start = time.monotonic()
        with tempfile.TemporaryDirectory() as d:
            Path(d, CHECKPOINT_FILE).write_bytes(state.to_bytes())
            ray.train.report({"how": "before"}, checkpoint=ray.train.Checkpoint.from_directory(d))
        return time.monotonic() - start

    persisted: list[float] = []
    writer = CheckpointWriter(0, 0, persisted.append)

    def with_writer() -> float:
        stall = writer.save(state, {"how": "after"})
        writer.wait()
        return stall

    figures = {"bytes": size}
    for name, save in (("before", synchronous), ("after", with_writer)):
        times = [save() for _ in range(config["repeats"] + 1)]
        figures[name], figures[f"{name}_first"] = statistics.median(times[1:]), times[0]
    figures["after_persist"] = statistics.median(persisted[1:])
    Path(config["out"]).write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--res", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "figures.json")
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        TorchTrainer(worker, train_loop_config={"res": args.res, "repeats": args.repeats, "out": str(out)},
                     scaling_config=ScalingConfig(num_workers=1),
                     run_config=RunConfig(name="stall", storage_path=str(Path(tmp, "storage")))).fit()
        ray.shutdown()
        f = json.loads(out.read_text())
    print(f"checkpoint stall at {args.res}², full-size nets ({f['bytes'] / 2**20:.0f} MiB), median of {args.repeats}")
    print(f"  before (serialize + write + ray.train.report on the loop): {f['before']:.3f} s")
    print(f"  after  (CheckpointWriter.save: copy into the snapshot):    {f['after']:.3f} s"
          f"  (the phase's first, which allocates the snapshot: {f['after_first']:.3f} s)")
    print(f"         (its writer thread, save -> report returned:        {f['after_persist']:.3f} s)")


if __name__ == "__main__":
    main()
