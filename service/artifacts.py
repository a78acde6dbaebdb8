"""What a run leaves for people to look at: sample grids, evaluations, the growth timeline, interpolations.

`phase_artifacts` writes a committed phase's sample grid and SWD; the coordinator runs it as a Ray task beside
the next phase's training (service/phase_eval.py), so a phase switch never waits for it. It streams: images
are generated and read in batches and only SWD descriptors are kept, at most PHASE_SWD_DESCRIPTORS per pyramid
level and set, spread over the `swd_images` images (128 neighbourhoods an image up to 256 images, fewer per
image beyond): its memory stays flat as swd_images grows, only its time grows. `run_artifacts` runs once the
run is FINISHED, in the driver. `progan sample`, `interpolate` and `eval` use the same pieces on any committed
phase, on a GPU when there is one.

Real images for SWD and MS-SSIM come from the phase's `PhaseStream`, as training reads them: shards are drawn
with replacement, so a set may hold a few images twice when the dataset is not much larger than the set. For
SWD that is still a sample of the data distribution; in the real MS-SSIM reference a pair of copies scores 1.

Every SWD result carries `swd_setup` (images, directions, repeats, mirrored reals, whether it is the paper's
protocol; per phase also the neighbourhoods per image): the per-phase figure (unmirrored reals, 1 x 128
directions) is a progress signal, not the paper's number. `paper_swd` is: 16384 images (all the dataset holds
when it has fewer, each once), 4 x 128 directions, 128 neighbourhoods per image, reals mirrored at random when
the run trains mirrored, as the reference's evaluate_metrics feeds its metrics; images are streamed into
descriptors in batches, so no image set is held whole.
"""

from __future__ import annotations

import io
import json
import math
import random
import tarfile
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from service.runstore import RunStore
from service.schedule import build_schedule
from service.spec import Phase, Spec, StorageOptions
from workers.checkpoint import load_generator, load_payload
from workers.data import DatasetError, Manifest, PhaseStream, check_dataset, read_manifest
from workers.evaluate import (SWDDescriptors, diversity_ms_ssim, encode_gif, encode_png, image_grid, quantize, slerp,
                              swd, swd_between)
from workers.networks import Generator
from workers.storage import filesystem, join

MIN_SWD_IMAGES = 16  # fewer descriptors than this say nothing about a distribution
MS_SSIM_MIN_RESOLUTION = 16  # five scales halve the image four times
MS_SSIM_PAIRS = 10_000  # the paper's count of random pairs
# At a phase switch SWD projects on 128 directions instead of the reference's 4 x 128: sorting the projections
# is most of its cost, and fewer directions leave the expected distance as it is, only noisier.
PHASE_SWD_REPEATS = 1
SWD_PATCHES = 128  # neighbourhoods per image and level, as the reference
# Descriptors kept per level and set at a phase: 256 images x 128 neighbourhoods, ~19 MB of RGB 7x7 descriptors.
# Beyond 256 images each image gives fewer neighbourhoods, so memory does not grow with swd_images.
PHASE_SWD_DESCRIPTORS = 256 * SWD_PATCHES
SWD_DIRECTIONS = 128  # per repeat, as the reference
PAPER_SWD_IMAGES = 16384  # the paper's SWD (its config.py: evaluate_metrics with num_images=16384)
PAPER_SWD_REPEATS = 4
SWD_SEED = 0  # patch centres and projection directions: fixed, so figures compare across phases and runs
TIMELINE_IMAGES = 4
INTERPOLATION_KEYFRAMES = 4
INTERPOLATION_STEPS = 8
GIF_FRAME_MS = 80


class EvaluationError(ValueError):
    """A request a run cannot answer: no such phase, too few images for a metric, a mismatched dataset."""


# ----------------------------------------------------------------------------------------------------------
# Generators and their images


def latents(n: int, latent_size: int, seed: int) -> Tensor:
    return torch.randn(n, latent_size, generator=torch.Generator().manual_seed(seed))


def fixed_latents(spec: Spec, n: int) -> Tensor:
    """The run's fixed latents: the same images at every phase, so grids can be compared across phases."""
    return latents(n, spec.latent_size, spec.seed)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def phase_generator(store: RunStore, spec: Spec, phase: Phase, where: torch.device | None = None) -> Generator:
    """The EMA generator of a committed phase (an uncommitted one is refused by the store)."""
    payload = load_payload(store.read_checkpoint(phase, spec), f"phase {phase.name} of {store.url}")
    return load_generator(payload, spec).to(where or torch.device("cpu"))


@torch.no_grad()
def generate(G: Generator, z: Tensor, batch: int = 64) -> Tensor:
    """Float NCHW images in [-1, 1] on the CPU, at alpha 1 (a committed phase has finished its fade)."""
    where = next(G.parameters()).device
    return torch.cat([G(z[i : i + batch].to(where)).cpu() for i in range(0, z.shape[0], batch)])


@torch.no_grad()
def generate_uint8(G: Generator, z: Tensor) -> Tensor:
    """Quantized images (see `quantize`) of one batch of latents, on the generator's device."""
    return quantize(G(z.to(next(G.parameters()).device)))


def grid_png(images: Tensor) -> bytes:
    """Images tiled into ceil(sqrt n) rows."""
    return encode_png(image_grid(images, math.ceil(math.sqrt(images.shape[0]))))


def sample_grid_png(G: Generator, spec: Spec) -> bytes:
    """The generator on the run's fixed latents, as the spec's N×N PNG grid; images are quantized batch by batch,
    so only the grid's bytes are ever held."""
    z = fixed_latents(spec, spec.eval.sample_grid**2)
    step = eval_batch(G.resolution)
    images = torch.cat([generate_uint8(G, z[i : i + step]).cpu() for i in range(0, z.shape[0], step)])
    return encode_png(image_grid(images, spec.eval.sample_grid))


def interpolation_frames(G: Generator, keyframes: Tensor, steps: int) -> Tensor:
    """steps frames per keyframe, slerping from each keyframe latent to the next and back to the first,
    so the GIF loops without a jump."""
    t = torch.arange(steps, dtype=keyframes.dtype).unsqueeze(1) / steps
    path = torch.cat([slerp(a, b, t) for a, b in zip(keyframes, keyframes.roll(-1, dims=0))])
    return generate(G, path)


def upsample_to(images: Tensor, resolution: int) -> Tensor:
    factor = resolution // images.shape[-1]
    return images.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3) if factor > 1 else images


# ----------------------------------------------------------------------------------------------------------
# Phases of a stored run


def committed_phases(store: RunStore, spec: Spec) -> list[Phase]:
    phases = build_schedule(spec)
    return [phases[r.index] for r in store.read_state().committed]


def resolve_phase(store: RunStore, spec: Spec, which: str | None) -> Phase:
    """A committed phase by index ("3") or name ("03-0016-fade"); None means the last committed one."""
    phases = build_schedule(spec)
    committed = committed_phases(store, spec)
    if not committed:
        raise EvaluationError(f"{store.url} has no committed phase yet")
    if which is None:
        return committed[-1]
    found = [p for p in phases if which in (p.name, str(p.index), f"{p.index:02d}")]
    if not found:
        raise EvaluationError(f"{store.url} has no phase {which!r}: its phases are 0…{len(phases) - 1} "
                              f"({phases[0].name} … {phases[-1].name})")
    if found[0] not in committed:
        raise EvaluationError(f"phase {found[0].name} of {store.url} is not committed; the last committed one is "
                              f"{committed[-1].name}")
    return found[0]


# ----------------------------------------------------------------------------------------------------------
# Metrics


def real_images(dataset: str, resolution: int, n: int, seed: int, options: StorageOptions | None) -> Tensor:
    """n uint8 NCHW real images of this resolution, read in this process (no loader workers), unmirrored."""
    return torch.cat(list(real_batches(dataset, resolution, n, seed, options)))


def real_batches(dataset: str, resolution: int, n: int, seed: int, options: StorageOptions | None) -> Iterator[Tensor]:
    """The images of `real_images`, as uint8 batches of at most 64."""
    batch = min(n, 64)
    stream = PhaseStream(dataset, resolution, batch, rank=0, world_size=1, seed=seed, storage_options=options,
                         mirror=False, num_workers=0)
    for images in stream:
        yield quantize(images)[:n]
        n -= images.shape[0]
        if n <= 0:
            return


def swd_levels(reals: Tensor, fakes: Tensor, repeats: int = 4) -> dict[str, float]:
    """{"<resolution>": SWD x1e3 per pyramid level, "avg": their mean}, the form eval.json and metrics use;
    `repeats` sets of 128 random directions (the reference takes 4)."""
    return _levels(swd(reals, fakes, seed=SWD_SEED, dirs=SWD_DIRECTIONS, repeats=repeats))


def _levels(result: dict) -> dict[str, float]:
    return {**{str(r): float(v) for r, v in result["levels"].items()}, "avg": result["avg"]}


def swd_setup(images: int, repeats: int, mirrored: bool, paper: bool) -> dict:
    """What an SWD figure was measured with, stored beside it so that figures are compared like with like."""
    return {"images": images, "directions": SWD_DIRECTIONS, "repeats": repeats, "mirrored": mirrored,
            "paper": paper}


def eval_batch(resolution: int) -> int:
    """Images per batch when streaming: the reference's evaluation minibatch, clip(8192 / resolution, 4, 256)."""
    return min(256, max(4, 8192 // resolution))


def distinct_real_images(dataset: str, manifest: Manifest, resolution: int, n: int, seed: int, mirror: bool,
                         options: StorageOptions | None) -> Iterator[Tensor]:
    """Batches of uint8 NCHW real images, n in all (fewer only if some fail to decode), each image of the
    dataset at most once: whole shards in a seeded random order (`progan prepare` shuffles the images into
    shards), each image flipped horizontally with probability 1/2 when `mirror`."""
    shards = list(manifest.shards[resolution])
    rng = random.Random(seed)
    rng.shuffle(shards)
    mode = "L" if manifest.channels == 1 else "RGB"
    batch_size, batch, taken = eval_batch(resolution), [], 0
    for shard in shards:
        url = join(dataset, shard.name)
        fs, path = filesystem(url, options)
        try:
            with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if taken == n:
                        break
                    if not (member.isfile() and member.name.endswith(".png")):
                        continue
                    pixels = _decode_png(tar.extractfile(member).read(), mode, resolution)
                    if pixels is None:
                        continue
                    batch.append(pixels[:, ::-1] if mirror and rng.random() < 0.5 else pixels)
                    taken += 1
                    if len(batch) == batch_size:
                        yield _to_nchw(batch)
                        batch = []
        except (tarfile.TarError, EOFError) as e:
            raise DatasetError(f"{url}: cannot read the shard ({e})") from None
        if taken == n:
            break
    if batch:
        yield _to_nchw(batch)


def _decode_png(data: bytes, mode: str, resolution: int) -> np.ndarray | None:
    """The pixels, or None for a sample that is not a readable PNG of this mode and size (skipped)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image) if image.mode == mode and image.size == (resolution, resolution) else None
    except (OSError, ValueError):
        return None


def _to_nchw(images: list[np.ndarray]) -> Tensor:
    x = torch.from_numpy(np.stack(images))
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def paper_swd(G: Generator, spec: Spec, phase: Phase, dataset: str, seed: int = 0,
              options: StorageOptions | None = None) -> dict:
    """SWD as the paper reports it (see the module docstring), streamed: only the descriptors are held."""
    res = phase.resolution
    if res < 16:
        raise EvaluationError(f"SWD needs images of at least 16x16; phase {phase.name} is {res}x{res}")
    manifest = read_manifest(dataset, options)
    check_dataset(manifest, res, spec.channels, dataset)
    reals = SWDDescriptors(res, seed=SWD_SEED)
    for images in distinct_real_images(dataset, manifest, res, min(PAPER_SWD_IMAGES, manifest.count), seed,
                                       spec.mirror, options):
        reals.add(images)
    if reals.count < MIN_SWD_IMAGES:
        raise EvaluationError(f"SWD needs at least {MIN_SWD_IMAGES} images; {dataset} has {reals.count} readable "
                              f"ones at {res}x{res}")
    fakes = SWDDescriptors(res, seed=SWD_SEED)
    z = latents(reals.count, spec.latent_size, seed)
    step = eval_batch(res)
    for i in range(0, reals.count, step):
        fakes.add(quantize(generate(G, z[i : i + step], batch=step)))
    result = swd_between(reals, fakes, dirs=SWD_DIRECTIONS, repeats=PAPER_SWD_REPEATS, seed=SWD_SEED)
    return {"phase": phase.name, "resolution": res, "images": reals.count, "swd": _levels(result),
            "swd_setup": swd_setup(reals.count, PAPER_SWD_REPEATS, spec.mirror, paper=True)}


def evaluate(G: Generator, spec: Spec, phase: Phase, dataset: str, n: int, metrics: set[str], seed: int = 0,
             options: StorageOptions | None = None) -> dict:
    """SWD of n generated images against n real ones, and MS-SSIM diversity of both sets (the paper's measures).

    Refuses what a metric cannot measure: SWD below 16² or under MIN_SWD_IMAGES images, MS-SSIM below 16² or
    under 2 images, a dataset without this resolution or with other channels than the run.
    """
    res = phase.resolution
    unknown = metrics - {"swd", "msssim"}
    if unknown or not metrics:
        raise EvaluationError(f"unknown metric(s) {', '.join(sorted(unknown))!r}; choose from swd, msssim"
                              if unknown else "no metric asked for; choose from swd, msssim")
    if "swd" in metrics and res < 16:
        raise EvaluationError(f"SWD needs images of at least 16x16; phase {phase.name} is {res}x{res}")
    if "swd" in metrics and n < MIN_SWD_IMAGES:
        raise EvaluationError(f"SWD needs at least {MIN_SWD_IMAGES} images, got {n}")
    if "msssim" in metrics and res < MS_SSIM_MIN_RESOLUTION:
        raise EvaluationError(f"MS-SSIM needs images of at least {MS_SSIM_MIN_RESOLUTION}x{MS_SSIM_MIN_RESOLUTION}; "
                              f"phase {phase.name} is {res}x{res}")
    if "msssim" in metrics and n < 2:
        raise EvaluationError(f"MS-SSIM needs at least 2 images, got {n}")
    check_dataset(read_manifest(dataset, options), res, spec.channels, dataset)

    fakes = quantize(generate(G, latents(n, spec.latent_size, seed)))
    reals = real_images(dataset, res, n, seed, options)
    result: dict = {"phase": phase.name, "resolution": res, "images": n}
    if "swd" in metrics:
        result["swd"] = swd_levels(reals, fakes, PAPER_SWD_REPEATS)
        result["swd_setup"] = swd_setup(n, PAPER_SWD_REPEATS, mirrored=False, paper=False)
    if "msssim" in metrics:
        pairs = min(MS_SSIM_PAIRS, n * (n - 1) // 2)
        result["ms_ssim"] = {"pairs": pairs, "generated": diversity_ms_ssim(fakes, pairs, seed=seed),
                             "real": diversity_ms_ssim(reals, pairs, seed=seed)}
    return result


# ----------------------------------------------------------------------------------------------------------
# What the coordinator calls


def evaluated(spec: Spec, phase: Phase) -> bool:
    """Whether a phase gets an eval.json: SWD needs 16² and is off with swd_images 0."""
    return spec.eval.swd_images > 0 and phase.resolution >= 16


def phase_artifacts(store: RunStore, spec: Spec, phase: Phase, where: torch.device | None = None) -> dict:
    """Write a committed phase's sample grid and, when `evaluated`, its SWD against spec.eval.swd_images real
    images (phases/<name>/eval.json); returns the evaluation ({} when there is none)."""
    G = phase_generator(store, spec, phase, where)
    store.write_bytes(store.layout.samples(phase), sample_grid_png(G, spec))
    if not evaluated(spec, phase):
        return {}
    evaluation = phase_swd(G, spec, phase, spec.eval.swd_images)
    store.write_bytes(store.layout.evaluation(phase), json.dumps(evaluation, indent=2).encode())
    return evaluation


def phase_swd(G: Generator, spec: Spec, phase: Phase, n: int) -> dict:
    """The per-phase SWD of n generated images against n real ones, streamed batch by batch into at most
    PHASE_SWD_DESCRIPTORS descriptors per level and set (see the module docstring)."""
    res, where = phase.resolution, next(G.parameters()).device
    patches = max(1, min(SWD_PATCHES, PHASE_SWD_DESCRIPTORS // n))
    reals, fakes = (SWDDescriptors(res, patches_per_image=patches, seed=SWD_SEED) for _ in range(2))
    for images in real_batches(spec.dataset, res, n, spec.seed, spec.storage_options):
        reals.add(images.to(where))
    z, step = latents(n, spec.latent_size, spec.seed + 1), eval_batch(res)  # not the grid's latents
    for i in range(0, n, step):
        fakes.add(generate_uint8(G, z[i : i + step]))
    result = swd_between(reals, fakes, dirs=SWD_DIRECTIONS, repeats=PHASE_SWD_REPEATS, seed=SWD_SEED)
    return {"phase": phase.name, "resolution": res, "images": n, "swd": _levels(result),
            "swd_setup": {**swd_setup(n, PHASE_SWD_REPEATS, mirrored=False, paper=False),
                          "patches_per_image": patches}}


def growth_timeline(store: RunStore, spec: Spec, n: int = TIMELINE_IMAGES) -> Tensor:
    """The run's first n fixed latents through every committed phase's EMA generator, nearest-upsampled to the
    final resolution; ordered row by row as n rows (one per latent) and one column per phase."""
    z = fixed_latents(spec, n)
    columns = [upsample_to(generate(phase_generator(store, spec, p), z), spec.resolution)
               for p in committed_phases(store, spec)]
    return torch.stack(columns, dim=1).flatten(0, 1)


def run_artifacts(store: RunStore, spec: Spec) -> list[str]:
    """The growth timeline and a latent interpolation of the final generator; returns their URLs."""
    timeline = growth_timeline(store, spec)
    final = phase_generator(store, spec, committed_phases(store, spec)[-1])
    keyframes = latents(INTERPOLATION_KEYFRAMES, spec.latent_size, spec.seed + 2)
    frames = interpolation_frames(final, keyframes, INTERPOLATION_STEPS)
    written = {
        "growth-timeline.png": encode_png(image_grid(timeline, TIMELINE_IMAGES)),
        "interpolation.png": encode_png(image_grid(frames, rows=1)),
        "interpolation.gif": encode_gif(frames, GIF_FRAME_MS),
    }
    urls = []
    for name, data in written.items():
        store.write_bytes(store.layout.artifact(name), data)
        urls.append(store.url_of(store.layout.artifact(name)))
    return urls
