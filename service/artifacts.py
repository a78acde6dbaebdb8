"""What a run leaves for people to look at: sample grids, evaluations, the growth timeline, interpolations."""

from __future__ import annotations

import torch

from service.runstore import RunStore
from service.schedule import Phase
from service.spec import Spec
from workers.checkpoint import load_generator, load_payload
from workers.evaluate import encode_png, image_grid


def fixed_latents(spec: Spec, n: int) -> torch.Tensor:
    """The run's fixed latents: the same images at every phase, so grids can be compared across phases."""
    return torch.randn(n, spec.latent_size, generator=torch.Generator().manual_seed(spec.seed))


def sample_grid_png(spec: Spec, checkpoint: bytes) -> bytes:
    """The EMA generator on the run's fixed latents, as an N×N PNG grid."""
    G = load_generator(load_payload(checkpoint), spec)
    with torch.no_grad():
        images = G(fixed_latents(spec, spec.eval.sample_grid**2))
    return encode_png(image_grid(images, spec.eval.sample_grid))


def phase_artifacts(store: RunStore, spec: Spec, phase: Phase, checkpoint: bytes) -> dict:
    """Write the phase's sample grid; returns what was measured."""
    store.write_bytes(store.layout.samples(phase), sample_grid_png(spec, checkpoint))
    return {}


def run_artifacts(store: RunStore, spec: Spec) -> list[str]:
    """Artifacts of a finished run; returns their URLs."""
    return []
