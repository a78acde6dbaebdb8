"""Is the frame along generated samples' borders early training, or an artifact of the networks?

The border gap of an image is how far the mean colour of its outer ring of pixels (1/16 of the side, at least
one pixel) lies from the mean colour of the rest, in 8-bit levels: the mean over channels of
|mean(ring) - mean(interior)|, averaged over images. The script prints it for:

1. a committed run (`--run URL`): the reals and G_ema of every committed phase, at that phase's resolution;
2. a controlled experiment (`--train RES`): G and D built at RES and trained in this process on the run's
   dataset with the project's own `train_step`, measuring the gap of G_ema every `--every` kimg. Three
   variants share the seed and the data: the networks as they are (zero padding, as the reference);
   replicate padding in every 3×3 conv of G and D; and the reals' side of the question, the gap of the reals
   after `fade_images` at alpha 0.5 (the faded reals a fade phase shows D). If the gap shrinks toward the
   reals' with training in every variant, the frame is early training; if it stays apart with zero padding
   only, the padding causes it.

Run: python bench/border.py --run runs/quickstart --train 16 --kimg 24
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.artifacts import committed_phases, generate, latents, phase_generator, real_images  # noqa: E402
from service.runstore import RunStore  # noqa: E402
from service.spec import Spec  # noqa: E402
from workers.checkpoint import fresh_state  # noqa: E402
from workers.data import PhaseStream  # noqa: E402
from workers.evaluate import quantize  # noqa: E402
from workers.losses import make_loss, penalty_grad_scale  # noqa: E402
from workers.step import train_step  # noqa: E402
from workers.networks import EqualizedConv2d, fade_images  # noqa: E402


def _ring(side: int, outer: int, inner: int) -> torch.Tensor:
    """Pixels at a distance d from the nearest edge with outer <= d < inner."""
    i = torch.arange(side)
    d = torch.minimum(i, side - 1 - i)
    d = torch.minimum(d[:, None], d[None, :])
    return (d >= outer) & (d < inner)


def border_gap(images: torch.Tensor) -> float:
    """Mean |ring colour - interior colour| in 8-bit levels (ring: 1/16 of the side); images are uint8 NCHW."""
    x, side = images.double(), images.shape[-1]
    ring = _ring(side, 0, max(1, side // 16))
    return (x[..., ring].mean(-1) - x[..., ~ring].mean(-1)).abs().mean().item()


def frame_step(images: torch.Tensor) -> float:
    """Mean |outermost pixel ring - the ring inside it| in 8-bit levels: a drawn frame is a step at the edge,
    while a smooth background has almost none."""
    x, side = images.double(), images.shape[-1]
    return (x[..., _ring(side, 0, 1)].mean(-1) - x[..., _ring(side, 1, 2)].mean(-1)).abs().mean().item()


class ReplicatePaddedConv2d(EqualizedConv2d):
    """The same equalized conv, padding the border by repeating its pixels instead of with zeros."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding:
            x = F.pad(x, [self.padding] * 4, mode="replicate")
        return F.conv2d(x, self.weight * self.scale, self.bias)


def replicate_padding(*nets: torch.nn.Module) -> None:
    for net in nets:
        for m in net.modules():
            if type(m) is EqualizedConv2d:
                m.__class__ = ReplicatePaddedConv2d


def run_table(url: str, n: int) -> None:
    store = RunStore(url)
    spec = store.read_spec()
    print(f"run {url}: border gap in 8-bit levels, {n} images each")
    print(f"{'phase':<18}{'res':>5}{'gap reals':>11}{'gap G_ema':>11}{'step reals':>12}{'step G_ema':>12}")
    for phase in committed_phases(store, spec):
        reals = real_images(spec.dataset, phase.resolution, n, spec.seed, spec.storage_options)
        fakes = quantize(generate(phase_generator(store, spec, phase), latents(n, spec.latent_size, spec.seed + 7)))
        print(f"{phase.name:<18}{phase.resolution:>5}{border_gap(reals):>11.2f}{border_gap(fakes):>11.2f}"
              f"{frame_step(reals):>12.2f}{frame_step(fakes):>12.2f}")


def train_curve(spec: Spec, res: int, kimg: float, every: float, n: int, padding: str
                ) -> list[tuple[float, float, float]]:
    torch.manual_seed(spec.seed)
    state = fresh_state(spec, 0, res, spec.lr[res], torch.device("cpu"))
    if padding == "replicate":
        replicate_padding(state.G, state.D, state.G_ema)
    loss = make_loss(spec.loss, penalty_grad_scale(spec.gp_scale, res, spec.resolution))
    batch = spec.minibatch[res]
    stream = iter(PhaseStream(spec.dataset, res, batch, 0, 1, spec.seed, mirror=spec.mirror, num_workers=0))
    z = latents(n, spec.latent_size, spec.seed + 7)
    curve, seen, next_mark = [], 0, 0.0
    while True:
        if seen >= next_mark * 1000:
            fakes = quantize(generate(state.G_ema, z))
            curve.append((seen / 1000, border_gap(fakes), frame_step(fakes)))
            next_mark += every
            if seen >= kimg * 1000:
                return curve
        train_step(state, loss, next(stream), 1.0, False, spec, 1)
        seen += batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a committed run's URL")
    ap.add_argument("--train", type=int, metavar="RES", help="train G and D at RES in this process")
    ap.add_argument("--kimg", type=float, default=24.0)
    ap.add_argument("--every", type=float, default=4.0)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.run:
        run_table(args.run, args.images)
    if args.train:
        spec = RunStore(args.run).read_spec() if args.run else None
        if spec is None:
            sys.exit("--train needs --run (its spec names the dataset and the networks)")
        res = args.train
        reals = real_images(spec.dataset, res, args.images, spec.seed, spec.storage_options)
        faded = quantize(fade_images(reals.float() / 127.5 - 1, 0.5))
        print(f"\n{res}² trained in this process, batch {spec.minibatch[res]}, lr {spec.lr[res]:g}: reals gap "
              f"{border_gap(reals):.2f} step {frame_step(reals):.2f}; reals faded at alpha 0.5 gap "
              f"{border_gap(faded):.2f} step {frame_step(faded):.2f}")
        curves = {}
        for padding in ("zero", "replicate"):
            started = time.monotonic()
            curves[padding] = train_curve(spec, res, args.kimg, args.every, args.images, padding)
            print(f"  {padding} padding: {time.monotonic() - started:.0f} s")
        print(f"{'kimg':>6}{'gap zero-pad':>14}{'gap replicate':>15}{'step zero-pad':>15}{'step replicate':>16}")
        for (k, gz, sz), (_, gr, sr) in zip(curves["zero"], curves["replicate"]):
            print(f"{k:>6.1f}{gz:>14.2f}{gr:>15.2f}{sz:>15.2f}{sr:>16.2f}")


if __name__ == "__main__":
    main()
