"""Data-plane figures, printed, never asserted:

- `progan prepare` throughput (images/s, all resolutions written) to a local folder and to S3;
- PhaseStream throughput (images/s) at each resolution from both, with 2 DataLoader workers;
- the images/s one ProGAN training step consumes at each resolution on this CPU (the networks of the
  quickstart and Fashion-MNIST configs), to compare with the loader;
- peak memory of prepare and of the loader (the process and all its descendants: encoder / DataLoader
  workers and the forkserver) for a dataset of N and of 10×N images, to show that it stays flat.

S3 is a SeaweedFS server started here exactly as the tests start it (`running_s3_server` of
tests/conftest.py). Run from the repository root:

    .venv/bin/python bench/data_bench.py [--images 2000] [--resolution 128] [--seconds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.spec import DEFAULT_MINIBATCH, load_spec, resolutions_up_to  # noqa: E402
from workers.data import PhaseStream  # noqa: E402
from workers.prepare import prepare  # noqa: E402


class PeakMemory:
    """Polls the RSS and PSS of this process and its descendants (the S3 server excluded) every 50 ms.
    PSS counts a page shared by n processes as 1/n, so forked workers are not counted n times over."""

    def __init__(self) -> None:
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            rss = pss = 0
            for pid in descendants(os.getpid()):
                with contextlib.suppress(OSError):
                    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                        if line.startswith("Rss:"):
                            rss += int(line.split()[1]) * 1024
                        elif line.startswith("Pss:"):
                            pss += int(line.split()[1]) * 1024
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)


def descendants(root: int) -> list[int]:
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            text = stat.read_text()
            if not text[text.index("(") + 1 : text.rindex(")")].startswith("weed"):
                parent[int(stat.parent.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in frontier]
        found += frontier
    return found


def loader_rate(url: str, res: int, seconds: float) -> float:
    stream = PhaseStream(url, res, batch_size=DEFAULT_MINIBATCH[res], rank=0, world_size=1, seed=0, num_workers=2)
    it = iter(stream)
    for _ in range(3):  # workers started, shuffle buffers filled
        next(it)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        n += next(it).shape[0]
    return n / (time.perf_counter() - start)


def train_rates(resolutions: list[int], seconds: float) -> dict[str, dict[int, float]] | None:
    """images/s of workers.step.train_step (a D and a G step, fade on) at each resolution, with the networks and
    minibatches of configs/quickstart.yaml and configs/fashion-mnist-32.yaml (paper-size networks manage about
    one image/s at 16² on a small CPU), if the training code exists yet. One torch thread, as in a 1-CPU Ray
    Train worker: two threads on a busy 2-core machine run many times slower, spinning on each other."""
    try:
        import torch

        from service.spec import Spec
        from workers.checkpoint import fresh_state
        from workers.step import train_step
        from workers.losses import make_loss
    except ImportError as e:
        print(f"(no training-step columns: {e})")
        return None
    torch.set_num_threads(1)
    rates: dict[str, dict[int, float]] = {}
    for config in ("quickstart", "fashion-mnist-32"):
        fields = load_spec(ROOT / "configs" / f"{config}.yaml").model_dump()
        for table in ("minibatch", "lr", "fade_kimg", "stable_kimg", "workers"):  # the config's, cut or extended
            fields[table] = {res: v for res, v in fields[table].items() if res in resolutions}
        spec = Spec.model_validate({**fields, "resolution": resolutions[-1]})
        loss = make_loss(spec.loss)
        rates[config] = {}
        for res in resolutions:
            state = fresh_state(spec, 0, res, 0.001, torch.device("cpu"))
            reals = torch.rand(spec.minibatch[res], spec.channels, res, res) * 2 - 1
            for _ in range(2):  # warm-up
                train_step(state, loss, reals, 0.5, res > 4, spec, 1)
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < seconds or n == 0:
                train_step(state, loss, reals, 0.5, res > 4, spec, 1)
                n += reals.shape[0]
            rates[config][res] = n / (time.perf_counter() - start)
    return rates


def timed_prepare(url: str, **kwargs) -> tuple[float, PeakMemory]:
    with PeakMemory() as memory:
        start = time.perf_counter()
        manifest = prepare("builtin", url, workers=2, progress=False, **kwargs)
        seconds = time.perf_counter() - start
    return manifest.count / seconds, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="N: images of the throughput datasets")
    parser.add_argument("--resolution", type=int, default=128, help="highest resolution prepared")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per figure")
    args = parser.parse_args()
    resolutions = resolutions_up_to(args.resolution)
    mib = 1 << 20

    import tests.conftest as conftest

    with conftest.running_s3_server() as s3, tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"# {os.cpu_count()} CPUs, load average {load}; builtin RGB images; SeaweedFS at {s3.endpoint}")
        urls = {"local": f"{tmp}/ds", "s3": f"s3://{s3.new_bucket()}/ds"}
        print(f"\nprepare {args.images} images up to {args.resolution}² (all resolutions), 2 encoder processes:")
        for where, url in urls.items():
            rate, memory = timed_prepare(url, resolution=args.resolution, limit=args.images)
            print(f"  {where:6s} {rate:6.0f} images/s   peak RSS {memory.rss / mib:5.0f} MiB, "
                  f"PSS {memory.pss / mib:5.0f} MiB")

        print("\nPhaseStream images/s, 2 DataLoader workers, the paper's minibatch:")
        print(f"  {'res':>5s} {'batch':>5s} {'local':>8s} {'s3':>8s}")
        for res in resolutions:
            rates = [loader_rate(url, res, args.seconds) for url in urls.values()]
            print(f"  {res:5d} {DEFAULT_MINIBATCH[res]:5d} {rates[0]:8.0f} {rates[1]:8.0f}")

        samples = 20 * args.images  # two passes over the larger set
        with PeakMemory() as idle:
            time.sleep(0.3)
        print(f"\npeak memory of this process and its descendants at 32², N and 10×N images "
              f"(idle before: RSS {idle.rss / mib:.0f} MiB, PSS {idle.pss / mib:.0f} MiB):")
        for count in (args.images, 10 * args.images):
            url = f"{tmp}/mem-{count}"
            _, prep = timed_prepare(url, resolution=32, limit=count)
            stream = PhaseStream(url, 32, batch_size=64, rank=0, world_size=1, seed=0, num_workers=2)
            with PeakMemory() as loading:
                for _ in islice(iter(stream), samples // 64):
                    pass
            print(f"  {count:6d} images: prepare RSS {prep.rss / mib:5.0f} MiB, PSS {prep.pss / mib:5.0f} MiB;  "
                  f"loader ({samples} samples) RSS {loading.rss / mib:5.0f} MiB, PSS {loading.pss / mib:5.0f} MiB")

    train = train_rates(resolutions, args.seconds)
    if train:
        print("\nimages/s a training step (D + G, fade on, 1 thread) consumes, with the networks and batches of:")
        print(f"  {'res':>5s}" + "".join(f" {name:>18s}" for name in train))
        for res in resolutions:
            print(f"  {res:5d}" + "".join(f" {rates[res]:18.1f}" for rates in train.values()))


if __name__ == "__main__":
    main()
