"""Every CLI command (prepare aside) against bad input: exit 2, one line on stderr, no traceback, nothing written
or deleted. The real `progan` console script runs each case against a run store with committed checkpoints,
built here through the project's own modules (no training), on local folders and on the real S3 server."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from service.runstore import RunStore
from service.schedule import PhaseCommitted, PhaseRecord, Start, Stop, build_schedule, new_run, transition
from service.spec import Spec, parse_spec
from tests.conftest import PROGAN, free_port, run_env
from workers.checkpoint import fresh_state

RUN = "bad"
SPEC = {
    "run": RUN, "dataset": "DATASET", "storage": "STORAGE", "resolution": 16, "channels": 3, "latent_size": 16,
    "fmap_base": 64, "fmap_max": 16, "minibatch": 8, "workers": 1, "fade_kimg": 0.016, "stable_kimg": 0.016,
    "data_workers": 0, "metrics_port": 0, "metrics_linger_seconds": 0, "eval": {"swd_images": 0, "sample_grid": 2},
}  # fmt: skip
COMMITTED = 4  # phases 00…03 committed (03 is the 16² fade), the run STOPPED at 04


def spec_text(dataset: str, storage: str, **overrides) -> str:
    return yaml.safe_dump({**SPEC, "dataset": dataset, "storage": storage} | overrides, sort_keys=False)


def build_run(spec: Spec, committed: int = COMMITTED) -> None:
    """A run store as the coordinator leaves it, with real checkpoints of fresh networks."""
    store = RunStore(spec.run_url, spec.storage_options)
    store.write_spec(spec)
    phases = build_schedule(spec)
    state = transition(new_run(len(phases)), Start())
    for p in phases[:committed]:
        ts = fresh_state(spec, p.index, p.resolution, p.lr, torch.device("cpu"))
        store.commit_phase(p, ts.to_bytes(), spec)
        state = transition(state, PhaseCommitted(PhaseRecord(p.index, p.name, p.images, 1.0, time.time())))
    store.write_state(transition(state, Stop()))


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """data/ (a 16² dataset), runs/bad (the run), other/bad (phase 03 committed under fmap_max 32)."""
    root = tmp_path_factory.mktemp("template")
    subprocess.run([PROGAN, "prepare", "builtin", str(root / "data"), "--resolution", "16", "--limit", "64",
                    "--shard-size", "32"], check=True, capture_output=True)
    build_run(parse_spec(spec_text(str(root / "data"), str(root / "runs"))))
    build_run(parse_spec(spec_text(str(root / "data"), str(root / "other"), fmap_max=32)))
    return root


@dataclass
class Where:
    """What a case sees: its own copy of the template, and the S3 run and refusing endpoint."""

    dir: Path
    s3_run: str = ""
    refused: str = ""
    s3: object = None

    @property
    def run(self) -> str:
        return str(self.dir / "runs" / RUN)

    def phase(self, name: str) -> Path:
        return self.dir / "runs" / RUN / "phases" / name

    def spec(self, **overrides) -> str:
        path = self.dir / "job.yaml"
        path.write_text(spec_text(**{"dataset": str(self.dir / "data"), "storage": str(self.dir / "runs")} | overrides))
        return str(path)

    def write(self, rel: str, data: bytes | str) -> None:
        path = self.dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)


def flip_byte(path: Path, at: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def empty_manifest(w: Where) -> str:
    dataset = w.dir / "empty-data"
    dataset.mkdir()
    manifest = json.loads((w.dir / "data" / "dataset.json").read_text())
    manifest.update(count=0, shards={str(r): [] for r in manifest["resolutions"]})
    (dataset / "dataset.json").write_text(json.dumps(manifest))
    return str(dataset)


P3 = "03-0016-fade"


@dataclass
class Case:
    id: str
    argv: Callable[[Where], list[str]]
    expect: str  # a piece of the one line
    setup: Callable[[Where], None] = lambda w: None
    s3: bool = False


CASES = [
    # plan: the spec alone
    Case("plan: missing spec", lambda w: ["plan", str(w.dir / "nope.yaml")], "cannot read the spec"),
    Case("plan: not YAML", lambda w: ["plan", str(w.dir / "x.yaml")], "not valid YAML",
         lambda w: w.write("x.yaml", "run: [unclosed\n")),
    Case("plan: a list, not a mapping", lambda w: ["plan", str(w.dir / "x.yaml")], "must be a YAML mapping",
         lambda w: w.write("x.yaml", "- a\n- b\n")),
    Case("plan: unknown field", lambda w: ["plan", w.spec(colour="red")], "colour: unknown field"),
    Case("plan: fade_kimg .inf", lambda w: ["plan", w.spec(fade_kimg=float("inf"))], "fade_kimg: must be a finite"),
    Case("plan: stable_kimg .nan", lambda w: ["plan", w.spec(stable_kimg=float("nan"))], "stable_kimg: must be a finite"),
    Case("plan --json: lr .nan", lambda w: ["plan", "--json", w.spec(lr=float("nan"))], "lr: must be a finite"),
    Case("plan: lr {8: -.inf}", lambda w: ["plan", w.spec(lr={8: float("-inf")})], "lr[8]: Input should be a finite"),
    Case("plan: seed 2**70", lambda w: ["plan", w.spec(seed=2**70)], "seed: Input should be less than or equal"),
    Case("plan: seed -1", lambda w: ["plan", w.spec(seed=-1)], "seed: Input should be greater than or equal to 0"),
    Case("plan: latent_size 10**6", lambda w: ["plan", w.spec(latent_size=10**6)], "latent_size: Input should be less"),
    Case("plan: fmap_max 10**6", lambda w: ["plan", w.spec(fmap_max=10**6)], "fmap_max: Input should be less"),
    Case("plan: fmap_base 10**9", lambda w: ["plan", w.spec(fmap_base=10**9)], "fmap_base: Input should be less"),
    Case("plan: minibatch 10**6", lambda w: ["plan", w.spec(minibatch=10**6)], "minibatch[4]: at most 4096"),
    Case("plan: eval.swd_images 10**9", lambda w: ["plan", w.spec(eval={"swd_images": 10**9})],
         "eval.swd_images: Input should be less"),
    Case("plan: eval.sample_grid 1000", lambda w: ["plan", w.spec(eval={"sample_grid": 1000})],
         "eval.sample_grid: Input should be less"),
    Case("plan: checkpoint_kimg .inf", lambda w: ["plan", w.spec(checkpoint_kimg=float("inf"))],
         "checkpoint_kimg: Input should be a finite"),
    Case("plan: ema_beta .nan", lambda w: ["plan", w.spec(ema_beta=float("nan"))], "ema_beta: Input should be a finite"),
    Case("plan: stable_kimg 1e12", lambda w: ["plan", w.spec(stable_kimg=1e12)], "stable_kimg[4]: must be from 0"),
    # train: refused before anything is written or Ray is started
    Case("train: --new-run on a folder that is not a run", lambda w: ["train", w.spec(), "--new-run"],
         "is not a run (no state.json or spec.yaml): refusing to delete it",
         lambda w: (shutil.rmtree(w.run), w.write(f"runs/{RUN}/docs/thesis.txt", "years of work"))),
    Case("train: truncated state.json", lambda w: ["train", w.spec()], "state.json is not a valid run state",
         lambda w: truncate(Path(w.run, "state.json"))),
    Case("train: state names phase 99", lambda w: ["train", w.spec()], "phase 99 is not one of the run's 5 phases",
         lambda w: edit_json(Path(w.run, "state.json"), phase=99)),
    Case("train: invalid stored spec", lambda w: ["train", w.spec()], "stored spec is not valid",
         lambda w: w.write(f"runs/{RUN}/spec.yaml", spec_text("d", "s", resolution=33))),
    Case("train: fade_kimg .inf", lambda w: ["train", w.spec(fade_kimg=float("inf"))], "fade_kimg: must be a finite"),
    Case("train: seed 2**70", lambda w: ["train", w.spec(seed=2**70)], "seed: Input should be less than or equal"),
    Case("train: changed fmap_max", lambda w: ["train", w.spec(fmap_max=32)], "fmap_max: 16 -> 32"),
    Case("train: elastic range that cannot keep the global batch", lambda w: ["train", w.spec(workers={16: [1, 3]})],
         "minibatch[16]: 8 is not divisible by 3 workers (workers[16] = [1, 3])"),
    Case("train: placement ring", lambda w: ["train", w.spec(placement="ring")],
         "placement: Input should be 'pack' or 'spread'"),
    Case("train: manifest with count 0", lambda w: ["train", w.spec(dataset=empty_manifest(w))], "count"),
    Case("train: dataset without a manifest", lambda w: ["train", w.spec(dataset=str(w.dir / "runs"))],
         "has no dataset.json"),
    Case("train: S3 endpoint refuses connections",
         lambda w: ["train", w.spec(storage=f"s3://{w.s3_run.split('/')[2]}/runs",
                                    storage_options={"endpoint_url": w.refused})], "EndpointConnectionError", s3=True),
    # status and stop
    Case("status: not a run", lambda w: ["status", str(w.dir / "data")], "is not a run: it has no state.json"),
    Case("status: truncated state.json", lambda w: ["status", w.run], "state.json is not a valid run state",
         lambda w: truncate(Path(w.run, "state.json"))),
    Case("status: state.json is a list", lambda w: ["status", w.run], "state.json is not a valid run state",
         lambda w: w.write(f"runs/{RUN}/state.json", "[]")),
    Case("status: state.json not UTF-8", lambda w: ["status", w.run], "state.json is not a valid run state",
         lambda w: w.write(f"runs/{RUN}/state.json", b"\xff\xfe\x00garbage")),
    Case("status: state names phase 99", lambda w: ["status", w.run], "phase 99 is not one of the run's 5 phases",
         lambda w: edit_json(Path(w.run, "state.json"), phase=99)),
    Case("status: state of another schedule", lambda w: ["status", w.run], "counts 9 phases, the stored spec 5",
         lambda w: edit_json(Path(w.run, "state.json"), phase_count=9)),
    Case("status: unknown state", lambda w: ["status", w.run], "'DANCING' is not a valid Status",
         lambda w: edit_json(Path(w.run, "state.json"), status="DANCING")),
    Case("status: commits that skip a phase", lambda w: ["status", w.run], "do not match phase",
         lambda w: edit_json(Path(w.run, "state.json"), phase=1)),
    Case("status: invalid stored spec", lambda w: ["status", w.run], "stored spec is not valid",
         lambda w: w.write(f"runs/{RUN}/spec.yaml", spec_text("d", "s", lr=float("nan")))),
    Case("status: garbage driver.json", lambda w: ["status", w.run], "driver.json is not valid JSON",
         lambda w: w.write(f"runs/{RUN}/driver.json", "{not json")),
    Case("status: S3 endpoint refuses connections", lambda w: ["status", w.s3_run, "--endpoint-url", w.refused],
         "EndpointConnectionError", s3=True),
    Case("status: S3 run with a garbage state.json", lambda w: ["status", w.s3_run], "state.json is not a valid",
         lambda w: w.s3.pipe_file(w.s3_run + "/state.json", b"\x00{{"), s3=True),
    Case("stop: not a run", lambda w: ["stop", str(w.dir / "elsewhere")], "is not a run"),
    Case("stop: truncated state.json", lambda w: ["stop", w.run], "state.json is not a valid run state",
         lambda w: truncate(Path(w.run, "state.json"))),
    Case("stop: S3 endpoint refuses connections", lambda w: ["stop", w.s3_run, "--endpoint-url", w.refused],
         "EndpointConnectionError", s3=True),
    Case("stop: S3 bucket that does not exist", lambda w: ["stop", "s3://no-such-bucket-here/runs/bad"],
         "is not a run", s3=True),
    # sample, interpolate, eval: committed checkpoints that must not be loaded, and sizes that do not fit
    Case("sample --n 1e12", lambda w: ["sample", w.run, "--n", "1e12"], "Invalid value for '--n'"),
    Case("sample --n 0", lambda w: ["sample", w.run, "--n", "0"], "--n must be from 1 to 1024"),
    Case("sample --n 100000", lambda w: ["sample", w.run, "--n", "100000"], "--n must be from 1 to 1024"),
    Case("sample: truncated checkpoint", lambda w: ["sample", w.run], f"phase {P3} of",
         lambda w: truncate(w.phase(P3) / "checkpoint.pt")),
    Case("sample: flipped byte in the checkpoint", lambda w: ["sample", w.run], "sha256 does not match",
         lambda w: flip_byte(w.phase(P3) / "checkpoint.pt")),
    Case("sample: checkpoint and commit of another spec", lambda w: ["sample", w.run], "fmap_max: 32 -> 16",
         lambda w: [shutil.copy(w.dir / "other" / RUN / "phases" / P3 / f, w.phase(P3) / f)
                    for f in ("checkpoint.pt", "COMMITTED")]),
    Case("sample: stored spec edited (fmap_max)", lambda w: ["sample", w.run], "fmap_max: 16 -> 32",
         lambda w: w.write(f"runs/{RUN}/spec.yaml", spec_text(str(w.dir / "data"), str(w.dir / "runs"), fmap_max=32))),
    Case("sample: garbage checkpoint with a matching commit record", lambda w: ["sample", w.run],
         "not a readable checkpoint", lambda w: forge_commit(w.phase(P3), b"PK\x03\x04 not a checkpoint" * 50)),
    Case("sample: commit record without a checksum", lambda w: ["sample", w.run], "commit record is not valid",
         lambda w: w.write(f"runs/{RUN}/phases/{P3}/COMMITTED", json.dumps({"committed_at": 1.0}))),
    Case("sample: checkpoint file missing", lambda w: ["sample", w.run], "is missing",
         lambda w: (w.phase(P3) / "checkpoint.pt").unlink()),
    Case("sample: commit marker missing", lambda w: ["sample", w.run], "has no committed checkpoint",
         lambda w: (w.phase(P3) / "COMMITTED").unlink()),
    Case("sample --phase 99", lambda w: ["sample", w.run, "--phase", "99"], "has no phase '99'"),
    Case("sample: uncommitted phase", lambda w: ["sample", w.run, "--phase", "4"], "is not committed"),
    Case("sample: unwritable --out", lambda w: ["sample", w.run, "--out", str(w.dir / "no" / "dir" / "x.png")],
         "cannot write"),
    Case("sample: S3 endpoint refuses connections", lambda w: ["sample", w.s3_run, "--endpoint-url", w.refused],
         "EndpointConnectionError", s3=True),
    Case("sample: S3 run with a flipped checkpoint byte", lambda w: ["sample", w.s3_run], "sha256 does not match",
         lambda w: flip_s3_byte(w, f"{w.s3_run}/phases/{P3}/checkpoint.pt"), s3=True),
    Case("interpolate --keyframes 1000000", lambda w: ["interpolate", w.run, "--keyframes", "1000000"],
         "--keyframes must be from 2 to 64"),
    Case("interpolate --steps 0", lambda w: ["interpolate", w.run, "--steps", "0"], "--steps must be from 1 to 64"),
    Case("interpolate: flipped byte in the checkpoint", lambda w: ["interpolate", w.run], "sha256 does not match",
         lambda w: flip_byte(w.phase(P3) / "checkpoint.pt", at=5000)),
    Case("eval --n 10**9", lambda w: ["eval", w.run, "--n", str(10**9)], "--n must be from 1 to 16384"),
    Case("eval --metrics fid", lambda w: ["eval", w.run, "--metrics", "fid"], "unknown metric"),
    Case("eval: truncated checkpoint", lambda w: ["eval", w.run], "the commit recorded",
         lambda w: truncate(w.phase(P3) / "checkpoint.pt")),
    Case("eval: dataset without a manifest", lambda w: ["eval", w.run, "--dataset", str(w.dir / "runs")],
         "has no dataset.json"),
    Case("eval: manifest with count 0", lambda w: ["eval", w.run, "--dataset", empty_manifest(w)], "count"),
    # k8s render
    Case("k8s render: lr .nan", lambda w: ["k8s", "render", w.spec(lr=float("nan"))], "lr: must be a finite"),
    Case("k8s render: missing spec", lambda w: ["k8s", "render", str(w.dir / "nope.yaml")], "cannot read the spec"),
    Case("k8s render: a local dataset", lambda w: ["k8s", "render", w.spec()], "share no file system"),
    Case("k8s render: --gpus-per-node 0", lambda w: ["k8s", "render", w.spec(dataset="s3://b/d", storage="s3://b/r", metrics_port=9400),
                                                     "--gpus-per-node", "0"], "--gpus-per-node must be at least 1"),
    Case("k8s render: --nodes that the spec's workers do not fill",
         lambda w: ["k8s", "render", w.spec(dataset="s3://b/d", storage="s3://b/r", metrics_port=9400), "--nodes", "3"], "not --nodes 3"),
]


def forge_commit(phase_dir: Path, data: bytes) -> None:
    """Replace a checkpoint and fix up its commit record to match: the checksum passes, the content is junk."""
    (phase_dir / "checkpoint.pt").write_bytes(data)
    edit_json(phase_dir / "COMMITTED", sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def flip_s3_byte(w: Where, key: str) -> None:
    data = bytearray(w.s3.cat_file(key))
    data[1000] ^= 0xFF
    w.s3.pipe_file(key, bytes(data))


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def s3_snapshot(fs, prefix: str) -> dict[str, str]:
    fs.invalidate_cache()
    return {k: hashlib.sha256(fs.cat_file(k)).hexdigest() for k in sorted(fs.find(prefix))}


@pytest.fixture(scope="module")
def s3_run(request, template) -> tuple[object, str]:
    """The template's run copied to a bucket of the real S3 server (started only when an S3 case runs)."""
    server = request.getfixturevalue("s3_server")
    bucket = server.new_bucket()
    fs = server.filesystem()
    fs.put(str(template / "runs" / RUN), f"{bucket}/runs/", recursive=True)
    return server, f"s3://{bucket}/runs/{RUN}"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case: Case, template, tmp_path, request):
    shutil.copytree(template, tmp_path, dirs_exist_ok=True)
    w = Where(tmp_path)
    env = run_env({"RAY_ADDRESS": ""})
    if case.s3:
        server, w.s3_run = request.getfixturevalue("s3_run")
        w.s3, w.refused = server.filesystem(), f"http://127.0.0.1:{free_port()}"
        # a private copy of the S3 run for this case
        bucket = server.new_bucket()
        w.s3.copy(w.s3_run.removeprefix("s3://"), f"{bucket}/runs/{RUN}", recursive=True)
        w.s3_run = f"s3://{bucket}/runs/{RUN}"
        env = run_env(server.env(), {"RAY_ADDRESS": ""})
    case.setup(w)
    argv = case.argv(w)
    before = snapshot(tmp_path)
    s3_before = s3_snapshot(w.s3, w.s3_run.removeprefix("s3://").split("/")[0]) if case.s3 else None

    r = subprocess.run([PROGAN, *argv], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)

    print(f"{case.id} -> {r.returncode}, {r.stderr.strip()}")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ") and case.expect in r.stderr, r.stderr
    assert snapshot(tmp_path) == before  # nothing written, nothing deleted
    if case.s3:
        assert s3_snapshot(w.s3, w.s3_run.removeprefix("s3://").split("/")[0]) == s3_before


def test_train_refuses_bad_input_before_it_imports_ray_or_torch(tmp_path):
    """A bad spec, dataset or run store costs a fraction of a second, not the seconds Ray's and torch's imports
    take (service/run_open.py)."""
    spec = tmp_path / "job.yaml"
    spec.write_text(spec_text(dataset=str(tmp_path / "missing"), storage=str(tmp_path / "runs")))
    script = ("import sys, atexit; atexit.register(lambda: print(sorted({'ray', 'torch'} & set(sys.modules)))); "
              "from service.cli import app; app(['train', sys.argv[1]])")
    r = subprocess.run([sys.executable, "-c", script, str(spec)], capture_output=True, text=True,
                       env=run_env({"RAY_ADDRESS": ""}), timeout=120)
    assert r.returncode == 2 and "has no dataset.json" in r.stderr, r.stderr
    assert r.stdout.splitlines()[-1] == "[]", r.stdout
