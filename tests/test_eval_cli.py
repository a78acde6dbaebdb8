"""`progan sample`, `interpolate` and `eval`, and the artifacts a run leaves, on a run trained end to end
(real Ray cluster, real S3 run store and dataset)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from service.runstore import RunStore
from service.schedule import build_schedule, new_run
from service.spec import parse_spec
from tests.conftest import PROGAN, TRAINED_SWD_IMAGES, run_env, tiny_spec

pytestmark = pytest.mark.slow


def progan(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROGAN, *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env=env or run_env())


def prepare(dest: str, resolution: int, channels: int, limit: int, s3_server) -> None:
    subprocess.run([PROGAN, "prepare", "builtin", dest, "--resolution", str(resolution), "--channels", str(channels),
                    "--limit", str(limit), "--shard-size", "64"],
                   check=True, capture_output=True, env=run_env(s3_server.env()))  # fmt: skip


@pytest.fixture(scope="module")
def trained(trained_run) -> dict:
    """The session's 4² → 16² run on S3 (tests/conftest.py: trained_run)."""
    spec = parse_spec(trained_run.spec_path.read_text())
    return {"spec": spec, "run": spec.run_url, "bucket": trained_run.bucket, "dataset": trained_run.dataset,
            "stdout": trained_run.stdout}


def test_phases_from_16_have_an_swd_evaluation(trained):
    spec = trained["spec"]
    store = RunStore(trained["run"])
    for phase in build_schedule(spec):
        path = store.layout.evaluation(phase)
        if phase.resolution < 16:
            assert not store.fs.exists(path), phase.name
            continue
        evaluation = json.loads(store.fs.cat_file(path))
        assert evaluation["phase"] == phase.name and evaluation["resolution"] == 16
        assert evaluation["images"] == TRAINED_SWD_IMAGES
        assert set(evaluation["swd"]) == {"16", "avg"}
        assert math.isfinite(evaluation["swd"]["avg"]) and evaluation["swd"]["avg"] > 0
        assert evaluation["swd"]["avg"] == evaluation["swd"]["16"]
        assert evaluation["swd_setup"] == {"images": TRAINED_SWD_IMAGES, "directions": 128, "repeats": 1,
                                           "mirrored": False, "paper": False, "patches_per_image": 128}


def test_finished_run_has_growth_timeline_and_interpolation(trained):
    store = RunStore(trained["run"])
    phases = build_schedule(trained["spec"])
    for name in ("growth-timeline.png", "interpolation.png", "interpolation.gif"):
        assert f"wrote {store.url_of(store.layout.artifact(name))}" in trained["stdout"]
    with store.fs.open(store.layout.artifact("growth-timeline.png")) as f:
        timeline = Image.open(f)
        assert timeline.format == "PNG" and timeline.size == (16 * len(phases), 16 * 4)
    with store.fs.open(store.layout.artifact("interpolation.png")) as f:
        strip = Image.open(f)
        assert strip.size == (16 * 4 * 8, 16)
    with store.fs.open(store.layout.artifact("interpolation.gif")) as f:
        gif = Image.open(f)
        assert gif.format == "GIF" and gif.size == (16, 16) and gif.n_frames == 4 * 8


def test_sample_writes_a_grid_of_the_chosen_phase(trained, s3_server, tmp_path):
    # The endpoint comes from the option here, not from AWS_ENDPOINT_URL.
    env = {k: v for k, v in run_env(s3_server.env()).items() if k != "AWS_ENDPOINT_URL"}
    result = progan("sample", trained["run"], "--n", "9", "--seed", "3", "--endpoint-url", s3_server.endpoint,
                    cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "samples-04-0016-stable.png") as image:
        assert image.format == "PNG" and image.size == (48, 48) and image.mode == "RGB"

    out = tmp_path / "four.png"
    result = progan("sample", trained["run"], "--phase", "00-0004-stable", "--n", "5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    with Image.open(out) as image:
        assert image.size == (2 * 4, 3 * 4)  # ceil(sqrt 5) = 3 rows of 2

    again = tmp_path / "again.png"
    assert progan("sample", trained["run"], "--n", "9", "--seed", "3", "--out", str(again)).returncode == 0
    assert again.read_bytes() == (tmp_path / "samples-04-0016-stable.png").read_bytes()


def test_interpolate_writes_a_strip_and_a_gif(trained, tmp_path):
    prefix = tmp_path / "walk"
    result = progan("interpolate", trained["run"], "--phase", "3", "--keyframes", "3", "--steps", "4",
                    "--out", str(prefix))
    assert result.returncode == 0, result.stderr
    with Image.open(f"{prefix}.png") as strip:
        assert strip.format == "PNG" and strip.size == (16 * 12, 16)
    with Image.open(f"{prefix}.gif") as gif:
        assert gif.format == "GIF" and gif.size == (16, 16) and gif.n_frames == 12


def test_eval_reports_swd_and_ms_ssim(trained, tmp_path):
    result = progan("eval", trained["run"], "--dataset", trained["dataset"], "--n", "32", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["phase"] == "04-0016-stable" and report["resolution"] == 16 and report["images"] == 32
    assert set(report["swd"]) == {"16", "avg"} and report["swd"]["avg"] > 0
    ms = report["ms_ssim"]
    assert ms["pairs"] == 32 * 31 // 2
    assert 0 < ms["generated"] <= 1 and 0 < ms["real"] < 1

    table = progan("eval", trained["run"], "--phase", "03-0016-fade", "--metrics", "msssim", "--n", "8")
    assert table.returncode == 0, table.stderr
    assert "MS-SSIM generated" in table.stdout and "MS-SSIM real" in table.stdout and "SWD" not in table.stdout


@pytest.fixture(scope="module")
def mismatched(trained, s3_server) -> dict:
    """Datasets that cannot be compared with the 16² RGB run, and a run that has committed nothing."""
    bucket = trained["bucket"]
    prepare(f"s3://{bucket}/gray16", 16, 1, 64, s3_server)
    prepare(f"s3://{bucket}/rgb8", 8, 3, 64, s3_server)
    empty = RunStore(f"s3://{bucket}/runs/empty")
    empty.write_spec(trained["spec"])
    empty.write_state(new_run(len(build_schedule(trained["spec"]))))
    return {"gray16": f"s3://{bucket}/gray16", "rgb8": f"s3://{bucket}/rgb8", "empty": empty.url}


@pytest.mark.parametrize("args, message", [
    (["sample", "{bucket}/nothing-here"], "is not a run: it has no state.json"),
    (["sample", "{empty}"], "has no committed phase yet"),
    (["interpolate", "{empty}"], "has no committed phase yet"),
    (["eval", "{empty}"], "has no committed phase yet"),
    (["sample", "{run}", "--phase", "5"], "has no phase '5': its phases are 0…4"),
    (["eval", "{run}", "--phase", "04-0032-stable"], "has no phase '04-0032-stable'"),
    (["sample", "{run}", "--n", "0"], "--n must be from 1 to 1024, got 0"),
    (["interpolate", "{run}", "--keyframes", "1"], "--keyframes must be from 2 to 64, got 1"),
    (["interpolate", "{run}", "--steps", "0"], "--steps must be from 1 to 64, got 0"),
    (["eval", "{run}", "--dataset", "{gray16}"], "has 1 channel(s) but 3 are asked for"),
    (["eval", "{run}", "--dataset", "{rgb8}"], "has no 16x16 images"),
    (["eval", "{run}", "--dataset", "{bucket}/no-dataset"], "has no dataset.json"),
    (["eval", "{run}", "--metrics", "msssim", "--n", "1"], "MS-SSIM needs at least 2 images, got 1"),
    (["eval", "{run}", "--metrics", "swd", "--n", "8"], "SWD needs at least 16 images, got 8"),
    (["eval", "{run}", "--phase", "2", "--metrics", "swd"], "SWD needs images of at least 16x16"),
    (["eval", "{run}", "--phase", "2", "--metrics", "msssim"], "MS-SSIM needs images of at least 16x16"),
    (["eval", "{run}", "--metrics", "fid"], "unknown metric(s) 'fid'"),
])  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(trained, mismatched, args, message, tmp_path):
    names = {"run": trained["run"], "bucket": f"s3://{trained['bucket']}", **mismatched}
    result = progan(*(a.format(**names) for a in args), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert not os.listdir(tmp_path)  # nothing written


# ----------------------------------------------------------------------------------------------------------
# The paper's SWD, on a run store whose committed checkpoints are written here through the project's modules


PAPER_DATASET_IMAGES = 200


@pytest.fixture(scope="module")
def built(s3_server, tmp_path_factory) -> dict:
    """A 4² → 16² run on S3 with every phase committed from freshly initialised networks (no training: the
    figures only have to be measured the way they claim), its dataset 200 builtin images, trained mirrored."""
    import torch

    from service.schedule import PhaseCommitted, PhaseRecord, Start, transition
    from workers.checkpoint import fresh_state

    tmp = tmp_path_factory.mktemp("paper-swd")
    bucket = s3_server.new_bucket()
    dataset = f"s3://{bucket}/builtin16"
    prepare(dataset, 16, 3, PAPER_DATASET_IMAGES, s3_server)
    spec = parse_spec(tiny_spec(tmp, dataset, f"s3://{bucket}/runs", "built", mirror=True,
                                eval={"swd_images": 32, "sample_grid": 2}).read_text())
    store = RunStore(spec.run_url)
    store.write_spec(spec)
    phases = build_schedule(spec)
    state = transition(new_run(len(phases)), Start())
    for phase in phases:
        torch.manual_seed(phase.index)
        checkpoint = fresh_state(spec, phase.index, phase.resolution, phase.lr, torch.device("cpu")).to_bytes()
        store.commit_phase(phase, checkpoint, spec)
        state = transition(state, PhaseCommitted(PhaseRecord(phase.index, phase.name, phase.images, 1.0, 0.0)))
    store.write_state(state)
    return {"spec": spec, "store": store, "dataset": dataset, "env": run_env(s3_server.env()), "checkpoint": checkpoint}


def test_eval_paper_records_its_parameters(built):
    result = progan("eval", built["store"].url, "--paper", "--json", env=built["env"])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    # all the dataset's images, each once, as it holds fewer than 16384
    assert report["phase"] == "04-0016-stable" and report["images"] == PAPER_DATASET_IMAGES
    assert report["swd_setup"] == {"images": PAPER_DATASET_IMAGES, "directions": 128, "repeats": 4,
                                   "mirrored": True, "paper": True}
    assert set(report["swd"]) == {"16", "avg"} and report["swd"]["avg"] > 0

    table = progan("eval", built["store"].url, "--paper", env={**built["env"], "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert "200 images, 4 x 128 directions, reals mirrored, as the paper" in table.stdout

    plain = json.loads(progan("eval", built["store"].url, "--metrics", "swd", "--n", "32", "--json",
                              env=built["env"]).stdout)
    assert plain["swd_setup"] == {"images": 32, "directions": 128, "repeats": 4, "mirrored": False, "paper": False}


@pytest.mark.parametrize("args, message", [
    (["--paper", "--n", "64"], "--paper takes 16384 images (or all the dataset holds); leave out --n"),
    (["--paper", "--metrics", "swd,msssim"], "--paper measures SWD only"),
    (["--paper", "--phase", "2"], "SWD needs images of at least 16x16"),
])  # fmt: skip
def test_eval_paper_bad_input_is_one_line_and_exit_2(built, args, message, tmp_path):
    result = progan("eval", built["store"].url, *args, cwd=tmp_path, env=built["env"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr


def test_paper_swd_streams_what_held_images_give(built, monkeypatch):
    """Streaming the sets into descriptors batch by batch gives the SWD of the whole sets at once; the image
    count is capped at PAPER_SWD_IMAGES; reals are distinct images, mirrored at random as the run trains."""
    import torch

    from service import artifacts
    from workers.checkpoint import load_generator, load_payload
    from workers.evaluate import quantize

    spec, dataset = built["spec"], built["dataset"]
    phase = build_schedule(spec)[-1]
    G = load_generator(load_payload(built["checkpoint"]), spec)
    manifest = artifacts.read_manifest(dataset)

    def reals(mirror: bool) -> torch.Tensor:
        return torch.cat(list(artifacts.distinct_real_images(dataset, manifest, 16, PAPER_DATASET_IMAGES, 5, mirror,
                                                             None)))

    plain, mirrored = reals(False), reals(True)
    assert plain.shape == (PAPER_DATASET_IMAGES, 3, 16, 16)
    assert len({bytes(x.numpy()) for x in plain}) == PAPER_DATASET_IMAGES  # each image once
    flipped = [not torch.equal(m, p) for m, p in zip(mirrored, plain)]
    assert all(torch.equal(m, p.flip(-1)) for m, p, f in zip(mirrored, plain, flipped) if f)
    assert 0.3 < sum(flipped) / len(flipped) < 0.7

    monkeypatch.setattr(artifacts, "PAPER_SWD_IMAGES", 100)
    result = artifacts.paper_swd(G, spec, phase, dataset, seed=5)
    assert result["images"] == 100 and result["swd_setup"]["images"] == 100
    fakes = quantize(artifacts.generate(G, artifacts.latents(100, spec.latent_size, 5)))
    held = artifacts.swd_levels(mirrored[:100], fakes, repeats=4)
    assert result["swd"] == pytest.approx(held, rel=1e-5)


def test_phase_evaluation_states_its_setup(built):
    """eval.json of a phase says what its SWD used, so nobody takes it for the paper's figure."""
    from service.artifacts import phase_artifacts

    spec, store = built["spec"], built["store"]
    phase = build_schedule(spec)[-1]
    evaluation = phase_artifacts(store, spec, phase)
    stored = json.loads(store.fs.cat_file(store.layout.evaluation(phase)))
    assert stored == evaluation
    assert stored["swd_setup"] == {"images": 32, "directions": 128, "repeats": 1, "mirrored": False,
                                   "paper": False, "patches_per_image": 128}
