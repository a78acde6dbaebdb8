"""How close the quickstart's final generator comes to its data: SWD against the data's own floor.

SWD (x1e3 per Laplacian level, 4 x 128 directions as the paper) of --images G_ema images of the run's last
committed phase against --images reals, beside the floor: the SWD between two disjoint sets of --images reals
of the same dataset. Both real sets are read from disjoint shards (the dataset is shuffled when prepared), so
the floor is what sampling alone costs at that image count. Prints one table; a benchmark, not a test.

Run: python bench/demo_quality.py runs/quickstart --images 1000
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.artifacts import committed_phases, generate, latents, phase_generator, swd_levels  # noqa: E402
from service.runstore import RunStore  # noqa: E402
from workers.data import read_manifest  # noqa: E402
from workers.evaluate import quantize  # noqa: E402


def shard_images(dataset: str, names: list[str], n: int) -> torch.Tensor:
    """n uint8 NCHW images from these local shards, in stored order."""
    images: list[np.ndarray] = []
    for name in names:
        with tarfile.open(Path(dataset, name)) as tar:
            images += [np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())))
                       for m in tar if m.name.endswith(".png")]
        if len(images) >= n:
            break
    if len(images) < n:
        sys.exit(f"{dataset}: these shards hold {len(images)} images, {n} are needed")
    a = np.stack(images[:n])
    return torch.from_numpy(a if a.ndim == 4 else a[..., None]).permute(0, 3, 1, 2).contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a local run folder, e.g. runs/quickstart")
    ap.add_argument("--images", type=int, default=1000)
    args = ap.parse_args()
    store = RunStore(args.run)
    spec = store.read_spec()
    phase = committed_phases(store, spec)[-1]
    shards = [s.name for s in read_manifest(spec.dataset).shards[phase.resolution]]
    half = len(shards) // 2
    reference = shard_images(spec.dataset, shards[:half], args.images)
    other = shard_images(spec.dataset, shards[half:], args.images)
    fakes = quantize(generate(phase_generator(store, spec, phase), latents(args.images, spec.latent_size, 123)))
    rows = {"G_ema, " + phase.name: swd_levels(reference, fakes), "real vs real (floor)": swd_levels(reference, other)}
    levels = [k for k in rows["real vs real (floor)"] if k != "avg"]
    print(f"SWD x1e3, {args.images} images a set, 4 x 128 directions; reals from disjoint shards")
    print(f"{'':<28}" + "".join(f"{lvl + '²':>9}" for lvl in levels) + f"{'avg':>9}")
    for name, swd in rows.items():
        print(f"{name:<28}" + "".join(f"{swd[lvl]:>9.1f}" for lvl in levels) + f"{swd['avg']:>9.1f}")
    print(f"ratio to the floor (avg): {rows['G_ema, ' + phase.name]['avg'] / rows['real vs real (floor)']['avg']:.2f}")


if __name__ == "__main__":
    main()
