"""`progan prepare` end to end: real Fashion-MNIST and generated image sets, to a local folder and to a real S3
server, read back with tarfile and numpy rather than through the loader under test."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from service.cli import app
from workers.data import DatasetError, Manifest, PhaseStream, read_manifest
from workers.prepare import prepare
from workers.storage import filesystem, join

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, ["prepare", *map(str, args)])


def shard_samples(url: str, name: str) -> dict[str, np.ndarray]:
    fs, root = filesystem(url)
    with fs.open(join(root, name), "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        return {m.name.removesuffix(".png"): np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())))
                for m in tar}


def all_samples(url: str, manifest: Manifest, res: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for shard in manifest.shards[res]:
        samples = shard_samples(url, shard.name)
        assert len(samples) == shard.count
        out.update(samples)
    return out


def assert_pyramid(url: str, manifest: Manifest) -> dict[int, dict[str, np.ndarray]]:
    """Same keys at every resolution, and each level the rounded 2×2 box average of the stored level above."""
    levels = {res: all_samples(url, manifest, res) for res in manifest.resolutions}
    keys = [f"{i:08d}" for i in range(manifest.count)]
    for res, samples in levels.items():
        assert sorted(samples) == keys
        for image in samples.values():
            assert image.shape[:2] == (res, res) and image.dtype == np.uint8
            assert image.ndim == (2 if manifest.channels == 1 else 3)
    for lo, hi in zip(manifest.resolutions, manifest.resolutions[1:]):
        for key in keys:
            a = levels[hi][key].astype(np.float64)
            box = a.reshape(lo, 2, lo, 2, *a.shape[2:]).mean(axis=(1, 3))
            np.testing.assert_array_equal(levels[lo][key], np.round(box).astype(np.uint8), err_msg=f"{lo} {key}")
    return levels


@pytest.fixture(scope="module")
def fmnist_datasets(fashion_mnist, s3_server, tmp_path_factory):
    """The same 2,000 Fashion-MNIST images prepared through the CLI to a local folder and to S3 (endpoint and
    credentials from the AWS_* environment)."""
    local = str(tmp_path_factory.mktemp("fmnist") / "ds")
    s3 = f"s3://{s3_server.new_bucket()}/datasets/fmnist"
    for dest in (local, s3):
        result = cli(fashion_mnist, dest, "--resolution", 32, "--channels", 1, "--limit", 2000, "--seed", 7)
        assert result.exit_code == 0, result.output
        assert "2000 images at [4, 8, 16, 32], 0 skipped" in result.stdout
    return local, s3


def test_fmnist_manifests_agree_and_match_the_shards(fmnist_datasets):
    manifests = [read_manifest(url) for url in fmnist_datasets]
    local, s3 = manifests
    assert local == s3
    assert local.count == 2000 and local.channels == 1 and local.resolutions == [4, 8, 16, 32]
    assert local.skipped == [] and local.seed == 7 and local.source["kind"] == "idx"
    for url, manifest in zip(fmnist_datasets, manifests):
        fs, root = filesystem(url)
        for res in manifest.resolutions:
            assert [s.name for s in manifest.shards[res]] == [f"res-{res:04d}/shard-{i:06d}.tar" for i in (0, 1)]
            for shard in manifest.shards[res]:
                data = fs.cat_file(join(root, shard.name))
                assert (len(data), hashlib.sha256(data).hexdigest()) == (shard.size, shard.sha256)


def test_fmnist_pyramid_padding_and_seeded_order(fmnist_datasets, fashion_mnist):
    url = fmnist_datasets[0]
    levels = assert_pyramid(url, read_manifest(url))
    with gzip.open(fashion_mnist / "train-images-idx3-ubyte.gz") as f:
        source = np.frombuffer(f.read(16 + 2000 * 784)[16:], np.uint8).reshape(2000, 28, 28)
    order = np.random.default_rng(7).permutation(2000)
    for key, image in levels[32].items():
        expected = np.pad(source[order[int(key)]], 2)  # 28×28 padded with 2 pixels of background
        np.testing.assert_array_equal(image, expected)


def test_loader_reads_every_resolution_from_s3_and_local(fmnist_datasets):
    for url in fmnist_datasets:
        for res in (4, 8, 16, 32):
            stream = PhaseStream(url, res, batch_size=16, rank=0, world_size=1, seed=0, num_workers=1)
            batch = next(iter(stream))
            assert batch.shape == (16, 1, res, res)
            assert batch.min() >= -1 and batch.max() <= 1 and batch.min() < 0 < batch.max()


def make_image_folder(root: Path) -> list[str]:
    """Real-world-like files: several sizes, modes, formats; returns the candidate names in sorted order."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    (root / "sub").mkdir()

    def noise(h: int, w: int, c: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8).squeeze()

    Image.fromarray(noise(480, 640, 3)).save(root / "big.jpg", quality=90)
    Image.fromarray(noise(150, 100, 1)).save(root / "gray.png")
    palette = Image.fromarray(noise(64, 64, 3)).quantize(16)
    palette.info["transparency"] = 0
    palette.save(root / "palette.png", transparency=0)
    Image.fromarray(noise(80, 80, 4), "RGBA").save(root / "alpha.webp", lossless=True)
    Image.fromarray(noise(90, 120, 3)).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(noise(30, 20, 3)).save(root / "tiny.bmp")
    Image.fromarray(noise(40, 40, 1).astype(np.uint16) * 257).save(root / "sub" / "deep.png")
    Image.fromarray(noise(64, 48, 3)).save(root / "sub" / "nested.webp", quality=80)
    make_rotated_jpeg(root / "rotated.jpg")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" + bytes(200))
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"ignored")
    return sorted(["big.jpg", "gray.png", "palette.png", "alpha.webp", "cmyk.jpg", "tiny.bmp", "sub/deep.png",
                   "sub/nested.webp", "rotated.jpg", "broken.jpg"])


def make_rotated_jpeg(path: Path) -> None:
    """64×32 stored, left half black and right half white, with EXIF orientation 6 ("rotate 90° clockwise"):
    shown upright it is 32×64 with the black half on top."""
    a = np.zeros((32, 64, 3), np.uint8)
    a[:, 32:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(path, exif=exif, quality=95)


@pytest.mark.parametrize("channels", [1, 3])
def test_mixed_folder_skips_the_corrupt_file(tmp_path, channels):
    names = make_image_folder(tmp_path / "images")
    manifest = prepare(str(tmp_path / "images"), str(tmp_path / "ds"), resolution=32, channels=channels,
                       shard_size=4, workers=2, progress=False)
    assert manifest.count == len(names) - 1
    assert [s.path for s in manifest.skipped] == ["broken.jpg"]
    assert manifest.skipped[0].reason
    assert manifest.source == {"kind": "folder", "path": str((tmp_path / "images").resolve()),
                               "candidates": len(names)}
    assert [s.count for s in manifest.shards[32]] == [4, 4, 1]
    assert_pyramid(str(tmp_path / "ds"), manifest)


def test_exif_orientation_is_applied(tmp_path):
    (tmp_path / "src").mkdir()
    make_rotated_jpeg(tmp_path / "src" / "rotated.jpg")
    manifest = prepare(str(tmp_path / "src"), str(tmp_path / "ds"), resolution=32, channels=1, workers=1,
                       progress=False)
    image = all_samples(str(tmp_path / "ds"), manifest, 32)["00000000"].astype(float)
    assert image[:12].mean() < 40 and image[20:].mean() > 215  # black on top: rotated upright
    assert abs(image[:, :16].mean() - image[:, 16:].mean()) < 10


def test_archives_cifar_and_builtin_sources(tmp_path):
    pngs = {}
    for i in range(5):
        buf = io.BytesIO()
        Image.fromarray(np.full((20 + i, 24, 3), 40 * i, np.uint8)).save(buf, format="PNG")
        pngs[f"img/{i}.png"] = buf.getvalue()
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as z:
        for name, data in pngs.items():
            z.writestr(name, data)
        z.writestr("__MACOSX/img/._0.png", b"resource fork")
    with tarfile.open(tmp_path / "images.tar", "w") as t:
        for name, data in pngs.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    for archive in ("images.zip", "images.tar"):
        m = prepare(str(tmp_path / archive), str(tmp_path / f"{archive}.ds"), resolution=8, workers=1,
                    progress=False)
        assert (m.count, m.skipped, m.source["kind"]) == (5, [], archive.split(".")[1])
        levels = assert_pyramid(str(tmp_path / f"{archive}.ds"), m)
        assert sorted(int(a[0, 0, 0]) for a in levels[8].values()) == [0, 40, 80, 120, 160]

    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (6, 3072), dtype=np.uint8) for _ in range(2)]
    for i, data in enumerate(batches, 1):
        with open(cifar / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": [0] * len(data)}, f, protocol=2)
    m = prepare(str(tmp_path), str(tmp_path / "cifar.ds"), resolution=32, limit=10, workers=1, progress=False)
    assert (m.count, m.source["kind"]) == (10, "cifar10")
    stored = sorted(a.tobytes() for a in assert_pyramid(str(tmp_path / "cifar.ds"), m)[32].values())
    source = np.concatenate(batches)[:10].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert stored == sorted(a.tobytes() for a in source)

    digests = []
    for seed in (3, 3, 4):
        dest = tmp_path / f"builtin-{len(digests)}"
        m = prepare("builtin", str(dest), resolution=16, limit=12, seed=seed, workers=1, progress=False)
        assert m.count == 12 and m.source["kind"] == "builtin"
        levels = assert_pyramid(str(dest), m)
        assert np.std([a.mean() for a in levels[16].values()]) > 5  # the images differ
        digests.append([s.sha256 for s in m.shards[16]])
    assert digests[0] == digests[1] != digests[2]


def test_existing_dataset_needs_overwrite(tmp_path):
    dest = tmp_path / "ds"
    assert cli("builtin", dest, "-r", 8, "--limit", 5).exit_code == 0
    result = cli("builtin", dest, "-r", 8, "--limit", 3)
    assert result.exit_code == 2
    assert "already holds a complete dataset" in result.stderr and "--overwrite" in result.stderr
    assert read_manifest(str(dest)).count == 5
    result = cli("builtin", dest, "-r", 16, "--limit", 3, "--overwrite")
    assert result.exit_code == 0, result.output
    assert read_manifest(str(dest)).count == 3
    assert sorted(p.name for p in dest.iterdir()) == ["dataset.json", "res-0004", "res-0008", "res-0016"]


@pytest.fixture
def error_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "a.png").write_bytes(b"not a png")
    (tmp_path / "unreadable" / "b.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "images.tar.gz").write_bytes(gzip.compress(b"x"))
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing", "{tmp}/out", "-r", 32], "no such file or folder"),
    (["{tmp}/notes.txt", "{tmp}/out", "-r", 32], "unknown source kind"),
    (["{tmp}/images.tar.gz", "{tmp}/out", "-r", 32], "compressed tar"),
    (["{tmp}/empty", "{tmp}/out", "-r", 32], "no images found"),
    (["{tmp}/unreadable", "{tmp}/out", "-r", 32], "none of its 2 images could be read"),
    (["builtin", "{tmp}/out", "-r", 12], "power of two from 8 to 1024, got 12"),
    (["builtin", "{tmp}/out", "-r", 4], "power of two from 8 to 1024, got 4"),
    (["builtin", "{tmp}/out", "-r", 2048], "power of two from 8 to 1024, got 2048"),
    (["builtin", "{tmp}/out", "-r", 32, "--channels", 2], "--channels must be 1 or 3, got 2"),
    (["builtin", "{tmp}/out", "-r", 32, "--shard-size", 0], "--shard-size must be at least 1"),
])  # fmt: skip
def test_bad_input_exits_2_with_one_line(error_sources, args, message):
    result = cli(*(str(a).format(tmp=error_sources) for a in args))
    assert result.exit_code == 2, result.output
    last = result.stderr.splitlines()[-1]  # a progress bar may come before it
    assert last.startswith("error: ") and message in last
    assert not (error_sources / "out" / "dataset.json").exists()


def test_missing_bucket_and_unreachable_endpoint(s3_server, monkeypatch):
    result = cli("builtin", "s3://no-such-bucket-here/ds", "-r", 8, "--limit", 4)
    assert result.exit_code == 2
    assert "cannot write to s3://no-such-bucket-here/ds" in result.stderr and "bucket" in result.stderr
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries would only make this slow
    closed = "http://127.0.0.1:9"
    result = cli("builtin", f"s3://{s3_server.new_bucket()}/ds", "-r", 8, "--limit", 4, "--endpoint-url", closed)
    assert result.exit_code == 2
    assert "cannot write to" in result.stderr and "Could not connect" in result.stderr
    with pytest.raises(DatasetError, match="cannot read dataset.json"):
        from service.spec import StorageOptions

        read_manifest("s3://b/ds", StorageOptions(endpoint_url=closed))


def test_interrupted_prepare_is_refused_then_completed(tmp_path):
    dest = tmp_path / "ds"
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "prepare", "builtin", str(dest), "-r", "16", "--limit", "1000000",
         "--shard-size", "50", "--workers", "2"],
        cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell may ignore it
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (dest / "res-0016" / "shard-000003.tar").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=30) == 130
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (dest / "dataset.json").exists()
    with pytest.raises(DatasetError, match="has no dataset.json: not a dataset or an incomplete prepare"):
        PhaseStream(str(dest), 16, batch_size=4, rank=0, world_size=1, seed=0)

    result = cli("builtin", dest, "-r", 16, "--limit", 60, "--shard-size", 50)  # no --overwrite needed
    assert result.exit_code == 0, result.output
    manifest = read_manifest(str(dest))
    assert manifest.count == 60
    assert sorted(p.name for p in (dest / "res-0016").iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    assert_pyramid(str(dest), manifest)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": _RunsCode()}))
    with pytest.raises(DatasetError, match="posix.system is not allowed in a CIFAR-10 batch"):
        prepare(str(folder), str(tmp_path / "out"), resolution=32, workers=1, progress=False)
