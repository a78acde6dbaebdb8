"""The per-phase evaluation streams: its memory stays flat as swd_images grows, and up to 256 images its SWD is
the figure of the whole sets held at once (the protocol before streaming)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.artifacts import latents, phase_swd, quantize, generate, real_images, swd_levels
from service.schedule import build_schedule
from service.spec import parse_spec
from workers.checkpoint import fresh_state
from workers.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
SPEC = "run: r\ndataset: {data}\nstorage: {tmp}\nresolution: 16\nlatent_size: 16\nfmap_base: 32\nfmap_max: 16\n"

# Peak RSS of a process that builds the generator and runs phase_swd once, over its RSS just before.
PROBE = """
import json, resource, sys
import psutil, torch
from service.artifacts import phase_swd
from service.schedule import build_schedule
from service.spec import parse_spec
from workers.checkpoint import fresh_state
torch.set_num_threads(1)
spec = parse_spec(sys.argv[1])
phase = build_schedule(spec)[-1]
G = fresh_state(spec, phase.index, phase.resolution, phase.lr, torch.device("cpu")).G_ema
before = psutil.Process().memory_info().rss
phase_swd(G, spec, phase, int(sys.argv[2]))
print(json.dumps({"before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


@pytest.fixture(scope="module")
def spec_text(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("phase-eval")
    prepare("builtin", str(tmp / "data"), resolution=16, limit=300, progress=False)
    return SPEC.format(data=tmp / "data", tmp=tmp)


def evaluation_memory(spec_text: str, images: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE, spec_text, str(images)], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_evaluation_memory_stays_flat_as_swd_images_grows(spec_text):
    grown = {}
    for images in (256, 1024, 4096):
        rss = evaluation_memory(spec_text, images)
        grown[images] = rss["peak"] - rss["before"]
        print(f"swd_images {images}: peak RSS {rss['peak'] / 2**20:.0f} MiB, "
              f"{grown[images] / 2**20:.0f} MiB over the process before evaluating")
    # Held whole, 16x the images would hold 16x the descriptors (~600 MB more here).
    assert grown[4096] < 1.5 * grown[256], grown


def test_streamed_phase_swd_is_the_held_sets_swd(spec_text):
    spec = parse_spec(spec_text)
    phase = build_schedule(spec)[-1]
    G = fresh_state(spec, phase.index, phase.resolution, phase.lr, torch.device("cpu")).G_ema
    n = 96
    result = phase_swd(G, spec, phase, n)
    fakes = quantize(generate(G, latents(n, spec.latent_size, spec.seed + 1)))
    reals = real_images(spec.dataset, phase.resolution, n, spec.seed, spec.storage_options)
    assert result["swd"] == pytest.approx(swd_levels(reals, fakes, repeats=1), rel=1e-5)
    assert result["swd_setup"]["patches_per_image"] == 128
    assert phase_swd(G, spec, phase, 1024)["swd_setup"]["patches_per_image"] == 32
