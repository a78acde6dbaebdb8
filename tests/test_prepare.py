"""`progan prepare` end to end: real Fashion-MNIST and generated image sets, to a local folder and to a real S3
server, read back with tarfile and numpy rather than through the loader under test."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from service.cli import app
from tests.conftest import PROGAN
from workers.data import DatasetError, Manifest, PhaseStream, Skipped, read_manifest
from workers.prepare import prepare
from workers.storage import filesystem, join

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, ["prepare", *map(str, args)])


def shard_entries(url: str, name: str, suffix: str) -> dict[str, bytes]:
    fs, root = filesystem(url)
    with fs.open(join(root, name), "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        return {m.name.removesuffix(suffix): tar.extractfile(m).read() for m in tar if m.name.endswith(suffix)}


def shard_samples(url: str, name: str) -> dict[str, np.ndarray]:
    return {key: np.asarray(Image.open(io.BytesIO(png))) for key, png in shard_entries(url, name, ".png").items()}


def sources(url: str, manifest: Manifest, res: int) -> dict[str, str]:
    """key -> the source each sample's metadata records."""
    out: dict[str, str] = {}
    for shard in manifest.shards[res]:
        out.update({key: json.loads(meta)["source"] for key, meta in shard_entries(url, shard.name, ".json").items()})
    return out


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
    assert local.source["sample_source"] == "file#index: the image's index in that file"
    assert local.tool == "progan-service 0.1.0"
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
    manifest = read_manifest(url)
    for res in manifest.resolutions:  # every sample names the image it was made from
        expected_sources = {key: f"train-images-idx3-ubyte.gz#{order[int(key)]}" for key in levels[32]}
        assert sources(url, manifest, res) == expected_sources


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
                               "candidates": len(names), "sample_source": "path relative to the folder"}
    assert [s.count for s in manifest.shards[32]] == [4, 4, 1]
    levels = assert_pyramid(str(tmp_path / "ds"), manifest)
    provenance = sources(str(tmp_path / "ds"), manifest, 32)
    assert sorted(provenance.values()) == sorted(set(names) - {"broken.jpg"})
    gray = next(key for key, source in provenance.items() if source == "gray.png")  # 150×100: cropped, resized
    expected = np.asarray(Image.open(tmp_path / "images" / "gray.png").crop((0, 25, 100, 125))
                          .resize((32, 32), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(levels[32][gray] if channels == 1 else levels[32][gray][..., 0], expected)


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
        for key, source in sources(str(tmp_path / f"{archive}.ds"), m, 8).items():  # img/i.png is 40·i grey
            assert source == f"img/{int(levels[8][key][0, 0, 0]) // 40}.png"

    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (6, 3072), dtype=np.uint8) for _ in range(2)]
    for i, data in enumerate(batches, 1):
        with open(cifar / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": [0] * len(data)}, f, protocol=2)
    m = prepare(str(tmp_path), str(tmp_path / "cifar.ds"), resolution=32, limit=10, workers=1, progress=False)
    assert (m.count, m.source["kind"]) == (10, "cifar10")
    stored = assert_pyramid(str(tmp_path / "cifar.ds"), m)[32]
    source = np.concatenate(batches)[:10].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert sorted(a.tobytes() for a in stored.values()) == sorted(a.tobytes() for a in source)
    for key, name in sources(str(tmp_path / "cifar.ds"), m, 32).items():  # data_batch_2#3 is the 10th image
        file, index = name.split("#")
        np.testing.assert_array_equal(stored[key], source[6 * (int(file[-1]) - 1) + int(index)])

    digests = []
    for seed in (3, 3, 4):
        dest = tmp_path / f"builtin-{len(digests)}"
        m = prepare("builtin", str(dest), resolution=16, limit=12, seed=seed, workers=1, progress=False)
        assert m.count == 12 and m.source["kind"] == "builtin"
        assert sorted(sources(str(dest), m, 4).values()) == sorted(f"builtin#{i}" for i in range(12))
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

        read_manifest("s3://b/ds", StorageOptions(endpoint_url=closed, retry_seconds=0))  # as `progan` checks it


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


# Deletion: prepare removes only what it writes.


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and modification time: equal trees mean nothing written or deleted."""
    return {p.relative_to(root).as_posix(): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def add_foreign_files(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "res-important.txt").write_text("mine")
    (dest / "res-notes").mkdir()
    (dest / "res-notes" / "shard-000000.tar").write_text("named like a shard, but not in a res-NNNN folder")


def test_prepare_refuses_a_folder_that_is_not_a_dataset_and_never_deletes_what_is_not_its_own(tmp_path):
    dest = tmp_path / "ds"
    add_foreign_files(dest)
    before = tree(tmp_path)
    result = cli("builtin", dest, "-r", 8, "--limit", 4)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: {dest} is not empty and not a dataset (it holds res-important.txt "
                                          "and 2 more); choose an empty DEST, or pass --overwrite to replace only the "
                                          "dataset files there"]
    assert tree(tmp_path) == before

    for resolution in (16, 8):  # the second run replaces the first, whose res-0016 it does not write
        result = cli("builtin", dest, "-r", resolution, "--limit", 4, "--overwrite")
        assert result.exit_code == 0, result.output
        assert (dest / "res-important.txt").read_text() == "mine"
        assert (dest / "res-notes" / "shard-000000.tar").read_text().startswith("named like a shard")
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "dataset.json", "res-0004", "res-0004/shard-000000.tar", "res-0008", "res-0008/shard-000000.tar",
        "res-important.txt", "res-notes", "res-notes/shard-000000.tar"]
    assert read_manifest(str(dest)).resolutions == [4, 8]


def test_prepare_on_s3_keeps_foreign_objects(s3_server):
    url = f"s3://{s3_server.new_bucket()}/ds"
    fs, root = filesystem(url)
    fs.pipe({join(root, "res-important.txt"): b"mine", join(root, "res-notes/a.txt"): b"notes"})
    result = cli("builtin", url, "-r", 8, "--limit", 4)
    assert result.exit_code == 2 and "is not empty and not a dataset (it holds res-important.txt" in result.stderr
    assert sorted(fs.find(root)) == [join(root, "res-important.txt"), join(root, "res-notes/a.txt")]
    for limit in (6, 4):
        assert cli("builtin", url, "-r", 8, "--limit", limit, "--overwrite").exit_code == 0
    assert fs.cat(join(root, "res-important.txt")) == b"mine" and fs.cat(join(root, "res-notes/a.txt")) == b"notes"
    assert read_manifest(url).count == 4


# Bad input through the real command line: exit 2, one line, no traceback, nothing written or deleted.

MEASURED = """import json, resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps([p.returncode, p.stdout, p.stderr, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))
"""


def progan(*args: str) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, peak RSS in KiB) of the venv's `progan` script, run by a fresh process so
    that the peak is that command's alone."""
    out = subprocess.run([sys.executable, "-c", MEASURED, PROGAN, *map(str, args)], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return tuple(json.loads(out.stdout))


def write_zip_with_a_huge_member(path: Path, good: bool) -> None:
    """big.bmp: 200 MB declared, a few hundred KB stored; and maybe a good image beside it."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("big.bmp", "w", force_zip64=True) as f:
            for _ in range(200):
                f.write(bytes(1 << 20))
        if good:
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), 99, np.uint8)).save(buf, format="PNG")
            z.writestr("good.png", buf.getvalue())


def write_sparse_tar(path: Path, name: str, size: int, fmt: str) -> None:
    """A tar of a few KB whose one member expands to `size` bytes (GNU tar's --sparse)."""
    folder = path.parent / f"{path.name}.in"
    folder.mkdir()
    with open(folder / name, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.truncate(size)
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(path), "-C", str(folder), name], check=True)
    (folder / name).unlink()
    folder.rmdir()


def png_bomb_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with one tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(1))) + chunk(b"IEND", b"")


def idx_header(count: int) -> bytes:
    return np.array([0x803, count, 28, 28], ">u4").tobytes() + bytes(2 * 784)


def cifar_batch(folder: Path, data: object, protocol: int = 2) -> None:
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": data, b"labels": [0]}, protocol=protocol))


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory) -> Path:
    """Every source the table below refuses, and DEST folders that must stay as they are."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty").mkdir()
    (tmp / "unreadable").mkdir()
    (tmp / "unreadable" / "a.png").write_bytes(b"not a png")
    (tmp / "unreadable" / "b.jpg").write_bytes(b"")
    (tmp / "bomb").mkdir()
    (tmp / "bomb" / "bomb.png").write_bytes(png_bomb_header(9000, 9000))
    (tmp / "notes.txt").write_text("hello")
    (tmp / "images.tar.gz").write_bytes(gzip.compress(b"x"))
    write_zip_with_a_huge_member(tmp / "huge.zip", good=False)
    write_sparse_tar(tmp / "sparse.tar", "big.png", 300 << 20, "gnu")
    (tmp / "claims-4g-idx3-ubyte").write_bytes(idx_header(2**32 - 1))
    (tmp / "claims-4g-gz").mkdir()
    (tmp / "claims-4g-gz" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_header(2**32 - 1)))
    row = list(range(256)) * 12
    cifar_batch(tmp / "cifar-repeated-rows", [row] * 10_000)
    cifar_batch(tmp / "cifar-256", [[256] * 3072])
    cifar_batch(tmp / "cifar-int64-256", np.full((1, 3072), 256, np.int64))
    cifar_batch(tmp / "cifar-object", np.array([[7] * 3072] * 4, dtype=object))
    cifar_batch(tmp / "cifar-shape", np.zeros((4, 100), np.uint8))
    add_foreign_files(tmp / "not-a-dataset")
    prepare("builtin", str(tmp / "complete"), resolution=8, limit=3, workers=1, progress=False)
    (tmp / "a-file").write_text("x")
    return tmp


def bad_dataset(tmp: Path, edit: Callable[[dict], str | None]) -> Path:
    """A small valid dataset with its dataset.json edited, and a spec that trains on it."""
    url = tmp / "ds"
    prepare("builtin", str(url), resolution=8, shard_size=10, limit=20, workers=1, progress=False)
    (tmp / "outside").mkdir()
    (tmp / "outside" / "shard-x.tar").write_bytes((url / "res-0008" / "shard-000000.tar").read_bytes())
    data = json.loads((url / "dataset.json").read_text())
    text = edit(data)
    (url / "dataset.json").write_text(json.dumps(data) if text is None else text)
    (tmp / "spec.yaml").write_text(f"run: bad\ndataset: {url}\nstorage: {tmp / 'runs'}\nresolution: 8\n")
    return tmp / "spec.yaml"


def shard(data: dict, field: str, value) -> None:
    data["shards"]["8"][0][field] = value


BAD_PREPARE = [
    ("missing source", ["{tmp}/missing", "{tmp}/out", "-r", 32], "no such file or folder"),
    ("unknown source kind", ["{tmp}/notes.txt", "{tmp}/out", "-r", 32], "unknown source kind"),
    ("compressed tar", ["{tmp}/images.tar.gz", "{tmp}/out", "-r", 32], "compressed tar"),
    ("no images", ["{tmp}/empty", "{tmp}/out", "-r", 32], "no images found"),
    ("no readable image", ["{tmp}/unreadable", "{tmp}/out", "-r", 32], "none of its 2 images could be read"),
    ("resolution 12", ["builtin", "{tmp}/out", "-r", 12], "power of two from 8 to 1024, got 12"),
    ("resolution 4", ["builtin", "{tmp}/out", "-r", 4], "power of two from 8 to 1024, got 4"),
    ("resolution 2048", ["builtin", "{tmp}/out", "-r", 2048], "power of two from 8 to 1024, got 2048"),
    ("channels 2", ["builtin", "{tmp}/out", "-r", 32, "--channels", 2], "--channels must be 1 or 3, got 2"),
    ("shard size 0", ["builtin", "{tmp}/out", "-r", 32, "--shard-size", 0], "--shard-size must be at least 1"),
    ("limit 0", ["builtin", "{tmp}/out", "-r", 32, "--limit", 0], "--limit must be at least 1"),
    ("zip member of 200 MB", ["{tmp}/huge.zip", "{tmp}/out", "-r", 8],
     "none of its 1 images could be read (first: big.bmp: big.bmp is 209715200 bytes, more than the 67108864"),
    ("sparse tar member of 300 MB", ["{tmp}/sparse.tar", "{tmp}/out", "-r", 8],
     "(first: big.png: big.png is not a regular file)"),
    ("PNG header of 9000x9000", ["{tmp}/bomb", "{tmp}/out", "-r", 8],
     "(first: bomb.png: ValueError: 9000x9000 pixels, more than the 67108864"),
    ("idx header claims 2^32-1", ["{tmp}/claims-4g-idx3-ubyte", "{tmp}/out", "-r", 32],
     "the idx header claims 4294967295 images, but the file can hold at most 2"),
    ("gzip idx header claims 2^32-1", ["{tmp}/claims-4g-gz", "{tmp}/out", "-r", 32],
     "the idx header claims 4294967295 images, but the file can hold at most 2"),
    ("CIFAR repeated row references", ["{tmp}/cifar-repeated-rows", "{tmp}/out", "-r", 32, "--limit", 1],
     "not a CIFAR-10 python batch (its data is a list, not uint8 of shape (N, 3072))"),
    ("CIFAR value 256 in a list", ["{tmp}/cifar-256", "{tmp}/out", "-r", 32],
     "not a CIFAR-10 python batch (its data is a list, not uint8 of shape (N, 3072))"),
    ("CIFAR value 256 in an int64 array", ["{tmp}/cifar-int64-256", "{tmp}/out", "-r", 32],
     "an array of dtype 'i8' is not allowed in a CIFAR-10 batch (only uint8)"),
    ("CIFAR object array", ["{tmp}/cifar-object", "{tmp}/out", "-r", 32],
     "an array of dtype 'O8' is not allowed in a CIFAR-10 batch (only uint8)"),
    ("CIFAR data of shape (4, 100)", ["{tmp}/cifar-shape", "{tmp}/out", "-r", 32],
     "its data is an array of uint8 of shape (4, 100), not uint8 of shape (N, 3072)"),
    ("DEST holds other files", ["builtin", "{tmp}/not-a-dataset", "-r", 8],
     "not-a-dataset is not empty and not a dataset (it holds res-important.txt and 2 more)"),
    ("DEST holds a dataset", ["builtin", "{tmp}/complete", "-r", 8], "already holds a complete dataset"),
    ("DEST is a file", ["builtin", "{tmp}/a-file", "-r", 8], "a-file is a file; DEST must be a folder"),
]  # fmt: skip

BAD_MANIFEST = [
    ("manifest count 0", lambda d: d.update(count=0),
     "dataset.json: count: Input should be greater than or equal to 1, got 0"),
    ("manifest channels 2", lambda d: d.update(channels=2), "dataset.json: channels: Input should be 1 or 3, got 2"),
    ("manifest resolution 12", lambda d: d.update(resolutions=[4, 8, 12]),
     "dataset.json: resolutions: must be 4, 8, … up to a power of two from 8 to 1024, got [4, 8, 12]"),
    ("manifest shard count 0", lambda d: shard(d, "count", 0),
     "dataset.json: shards.8.0.count: Input should be greater than or equal to 1, got 0"),
    ("manifest shard ../outside", lambda d: shard(d, "name", "../outside/shard-x.tar"),
     "dataset.json: shards.8.0.name: '../outside/shard-x.tar' is not res-0008/shard-NNNNNN.tar"),
    ("manifest shard size 1 TB", lambda d: shard(d, "size", 10**12),
     "dataset.json: shards.8.0.size: 1000000000000 bytes is more than 10 samples of 8x8 can take"),
    ("manifest sha256 not hex", lambda d: shard(d, "sha256", "x" * 64),
     "dataset.json: shards.8.0.sha256: String should match pattern '^[0-9a-f]{64}$'"),
    ("manifest version 1", lambda d: d.update(version=1),
     "dataset format version 1 is not 2; prepare the dataset again"),
    ("manifest not JSON", lambda d: '{"version": 2,', "dataset.json is not JSON ("),
]  # fmt: skip


@pytest.mark.parametrize("case, args, message", BAD_PREPARE, ids=[c[0] for c in BAD_PREPARE])
def test_bad_prepare_input_exits_2_with_one_line(bad_sources, baseline_rss, case, args, message):
    args = [str(a).format(tmp=bad_sources) for a in args]
    before = tree(bad_sources)
    code, stdout, stderr, peak = progan("prepare", *args, "--workers", 1)
    assert code == 2, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ") and message in stderr, stderr
    assert "Traceback" not in stdout + stderr
    assert tree(bad_sources) == before
    assert peak < baseline_rss + 64 * 1024, f"{case}: peak RSS {peak} KiB, {baseline_rss} KiB for a missing source"


@pytest.mark.parametrize("case, edit, message", BAD_MANIFEST, ids=[c[0] for c in BAD_MANIFEST])
def test_bad_manifest_exits_2_with_one_line(tmp_path, case, edit, message):
    spec = bad_dataset(tmp_path, edit)
    before = tree(tmp_path)
    code, stdout, stderr, _ = progan("train", spec)
    assert code == 2, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith(f"error: {tmp_path / 'ds'}: {message}"), stderr
    assert "Traceback" not in stdout + stderr
    assert tree(tmp_path) == before and not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def baseline_rss(tmp_path_factory) -> int:
    """Peak RSS of `progan prepare` refusing a missing source: what importing it takes."""
    code, _, _, peak = progan("prepare", tmp_path_factory.mktemp("none") / "missing", "out", "-r", 8)
    assert code == 2
    return peak


def test_a_huge_zip_member_is_skipped_unread(tmp_path, baseline_rss):
    write_zip_with_a_huge_member(tmp_path / "images.zip", good=True)
    assert (tmp_path / "images.zip").stat().st_size < 1 << 20
    code, stdout, stderr, peak = progan("prepare", tmp_path / "images.zip", tmp_path / "ds", "-r", 8, "--workers", 1)
    assert code == 0, stderr
    manifest = read_manifest(str(tmp_path / "ds"))
    assert manifest.count == 1
    assert manifest.skipped == [Skipped("big.bmp", "big.bmp is 209715200 bytes, more than the 67108864 a source "
                                                   "image may take")]
    assert peak < baseline_rss + 64 * 1024


def test_a_truncated_idx_file_and_an_oversized_cifar_batch_are_one_line_errors(tmp_path):
    (tmp_path / "short.gz").mkdir()
    compressed = gzip.compress(idx_header(5)[:16] + bytes(3 * 784))  # 3 images, and a trailer that says 5
    trailer = (16 + 5 * 784).to_bytes(4, "little")
    (tmp_path / "short.gz" / "train-images-idx3-ubyte.gz").write_bytes(compressed[:-4] + trailer)
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz: cannot read the idx file \(Incorrect length"):
        prepare(str(tmp_path / "short.gz"), str(tmp_path / "out"), resolution=32, workers=1, progress=False)
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    with open(cifar / "data_batch_1", "wb") as f:
        f.truncate(65 << 20)
    with pytest.raises(DatasetError, match=r"data_batch_1: not a CIFAR-10 python batch \(68157440 bytes, more than a "
                                           r"batch takes \(67108864\)\)$"):
        prepare(str(tmp_path), str(tmp_path / "out"), resolution=32, workers=1, progress=False)
    assert not (tmp_path / "out").exists()
