"""The job spec: defaults from DESIGN.md, per-resolution tables, and bad specs rejected with their field."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from service.spec import DEFAULT_MINIBATCH, SpecError, load_spec, parse_spec, spec_differences

ROOT = Path(__file__).resolve().parents[1]
GOOD = "run: r1\ndataset: data/x\nstorage: runs\nresolution: 32\n"


def test_defaults_follow_the_paper():
    s = parse_spec(GOOD)
    assert s.minibatch == {r: DEFAULT_MINIBATCH[r] for r in (4, 8, 16, 32)}
    assert s.lr == {4: 0.001, 8: 0.001, 16: 0.001, 32: 0.001}
    assert s.fade_kimg[8] == s.stable_kimg[4] == 600
    assert (s.latent_size, s.fmap_base, s.fmap_max, s.loss, s.ema_beta) == (512, 8192, 512, "wgan-gp", 0.999)
    assert [s.channels_at(r) for r in (4, 32, 64, 128, 1024)] == [512, 512, 256, 128, 16]


def test_elastic_workers_keep_the_global_batch():
    s = parse_spec(GOOD + "minibatch: 16\nworkers: {32: [1, 2]}\nplacement: spread\n")
    assert s.workers == {4: 1, 8: 1, 16: 1, 32: (1, 2)} and s.placement == "spread"
    assert parse_spec(s.to_yaml()) == s  # a range survives the spec's own YAML (ConfigMaps, the run store)
    from service.schedule import build_schedule

    last = build_schedule(s)[-1]
    assert (last.elastic, last.min_workers, last.max_workers, last.batch, last.batch_per_worker) == (True, 1, 2, 16, 8)
    assert parse_spec(GOOD + "workers: [2, 2]\n").workers[4] == 2  # a range of one size is that size
    assert parse_spec(GOOD).placement == "pack"


def test_scalar_and_partial_tables():
    s = parse_spec(GOOD + "minibatch: {4: 32}\nworkers: 2\nlr: {32: 0.002}\n")
    assert s.minibatch == {4: 32, 8: 128, 16: 128, 32: 64}
    assert s.workers == {4: 2, 8: 2, 16: 2, 32: 2}
    assert s.lr[32] == 0.002 and s.lr[4] == 0.001


@pytest.mark.parametrize(
    "extra, field",
    [
        ("colour: red\n", "colour"),  # unknown field
        ("storage_options: {endpoint_url: x, secret: y}\n", "storage_options.secret"),  # credentials never in a spec
        ("channels: 2\n", "channels"),
        ("latent_size: 0\n", "latent_size"),
        ("loss: hinge\n", "loss"),
        ("minibatch: {4: 10}\nworkers: {4: 4}\n", "minibatch[4]"),  # not divisible by workers
        ("minibatch: {24: 16}\n", "minibatch: key 24"),  # not a resolution
        ("minibatch: {64: 16}\n", "minibatch: key 64"),  # above the target
        ("stable_kimg: -1\n", "stable_kimg[4]"),  # negative images
        ("lr: 0\n", "lr[4]"),
        ("workers: {8: 0}\n", "workers[8]"),
        ("minibatch: {8: 8}\nworkers: {8: [1, 3]}\n", "minibatch[8]: 8 is not divisible by 3 workers"),  # elastic:
        ("minibatch: {8: 12}\nworkers: {8: [2, 3]}\n", "minibatch[8]: 6 images per worker (with 2"),  # every size
        ("workers: [2, 1]\n", "workers[4]: an elastic range is [min, max]"),
        ("workers: {8: [0, 2]}\n", "workers[8]: an elastic range"),
        ("workers: [1, 2, 4]\n", "workers: an elastic range is [min, max] of two integers"),
        ("placement: ring\n", "placement: Input should be 'pack' or 'spread'"),
        ("minibatch: {4: 6}\n", "minibatch[4]"),  # minibatch-stddev group of 4
        ("metrics_port: 70000\n", "metrics_port"),
        ("eval: {swd_images: -5}\n", "eval.swd_images"),
        ("fade_kimg: .inf\n", "fade_kimg: must be a finite number"),  # non-finite numbers, everywhere
        ("stable_kimg: .nan\n", "stable_kimg: must be a finite number"),
        ("lr: .nan\n", "lr: must be a finite number"),
        ("lr: {8: -.inf}\n", "lr[8]: Input should be a finite number"),
        ("checkpoint_kimg: .inf\n", "checkpoint_kimg: Input should be a finite number"),
        ("ema_beta: .nan\n", "ema_beta"),
        ("cpus_per_worker: .inf\n", "cpus_per_worker"),
        ("metrics_linger_seconds: .nan\n", "metrics_linger_seconds"),
        (f"seed: {2**70}\n", "seed: Input should be less than or equal to 4294967295"),  # torch and numpy seeds
        ("seed: -1\n", "seed"),
        ("latent_size: 5000\n", "latent_size"),  # sizes capped to fit memory
        ("fmap_max: 5000\n", "fmap_max"),
        ("fmap_base: 100000\n", "fmap_base"),
        ("minibatch: {8: 8192}\n", "minibatch[8]: at most 4096"),
        ("stable_kimg: 2000000\n", "stable_kimg[4]"),
        ("eval: {swd_images: 20000}\n", "eval.swd_images"),
        ("eval: {sample_grid: 17}\n", "eval.sample_grid"),
    ],
)
def test_bad_field_is_named(extra, field):
    with pytest.raises(SpecError) as e:
        parse_spec(GOOD + extra, "job.yaml")
    assert f"job.yaml: {field}" in str(e.value)


@pytest.mark.parametrize(
    "text, field",
    [
        ("run: r1\ndataset: d\nstorage: s\nresolution: 48\n", "resolution"),
        ("run: r1\ndataset: d\nstorage: s\nresolution: 4\n", "resolution"),
        ("run: r1\ndataset: d\nstorage: s\nresolution: 2048\n", "resolution"),
        ("run: r1\nstorage: s\nresolution: 32\n", "dataset"),
        ("run: r1\ndataset: d\nresolution: 32\n", "storage"),
        ("run: r1\ndataset: gs://b/d\nstorage: s\nresolution: 32\n", "dataset"),
        ("run: Bad Name\ndataset: d\nstorage: s\nresolution: 32\n", "run"),
    ],
)
def test_bad_required_field_is_named(text, field):
    with pytest.raises(SpecError, match=rf"spec: {field}: "):
        parse_spec(text)


def test_largest_accepted_values():
    s = parse_spec(GOOD + f"seed: {2**32 - 1}\nlatent_size: 4096\nfmap_max: 4096\nminibatch: 4096\n"
                   "eval: {swd_images: 16384, sample_grid: 16}\n")
    assert (s.seed, s.latent_size, s.minibatch[32], s.eval.swd_images) == (2**32 - 1, 4096, 4096, 16384)


def test_plan_json_is_strict_json(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(GOOD + "lr: 0.002\n")
    result = CliRunner().invoke(app, ["plan", str(path), "--json"])
    assert result.exit_code == 0
    json.loads(result.output, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_unreadable_yaml_and_not_a_mapping():
    with pytest.raises(SpecError, match="not valid YAML"):
        parse_spec("run: [unclosed\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        parse_spec("- a\n- b\n")


def test_differences_list_model_fields_only():
    a = parse_spec(GOOD)
    b = parse_spec(GOOD.replace("dataset: data/x", "dataset: s3://moved/x") + "latent_size: 256\nworkers: 2\n")
    assert spec_differences(a, b) == ["latent_size: 512 -> 256"]
    assert a.model_hash() != b.model_hash()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")))
def test_example_configs_validate(path):
    load_spec(path)


def test_cli_plan_and_bad_spec(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["plan", str(ROOT / "configs/quickstart.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    assert '"name": "06-0032-stable"' in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD + "resolution: 33\n")
    result = runner.invoke(app, ["plan", str(bad)])
    assert result.exit_code == 2
    assert "resolution: must be a power of two" in result.output
    assert list(tmp_path.iterdir()) == [bad]  # nothing written
    result = runner.invoke(app, ["plan", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "cannot read the spec" in result.output


def test_local_paths_become_absolute_and_urls_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = parse_spec(GOOD.replace("storage: runs", "storage: file://runs")).with_absolute_paths()
    assert (s.dataset, s.storage) == (str(tmp_path / "data/x"), str(tmp_path / "runs"))
    s3 = parse_spec(GOOD.replace("data/x", "s3://b/d")).with_absolute_paths()
    assert s3.dataset == "s3://b/d"
