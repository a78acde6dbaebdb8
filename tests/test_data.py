"""The per-phase stream: real shards on a local disk and on a real S3 server, read through DataLoader worker
processes; corruption is made by editing real shard bytes."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import logging
import multiprocessing
import re
import shutil
import subprocess
import sys
import tarfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import ROOT
from PIL import Image

from workers.data import DatasetError, Manifest, PhaseStream, check_dataset, read_manifest
from workers.prepare import prepare
from workers.storage import filesystem, join

COUNT, SHARD = 600, 100


@pytest.fixture(scope="module")
def datasets(s3_server, tmp_path_factory) -> dict[str, str]:
    """The same 600 builtin RGB images up to 16², in 6 shards per resolution, on disk and in S3."""
    urls = {"local": str(tmp_path_factory.mktemp("data") / "ds"), "s3": f"s3://{s3_server.new_bucket()}/ds"}
    for url in urls.values():
        prepare("builtin", url, resolution=16, shard_size=SHARD, limit=COUNT, seed=5, workers=1, progress=False)
    return urls


def take(stream: PhaseStream, n: int) -> list[torch.Tensor]:
    return list(islice(iter(stream), n))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_batches_have_the_shape_and_range_of_each_resolution(datasets, where):
    for res in (4, 8, 16):
        batches = take(PhaseStream(datasets[where], res, batch_size=8, rank=0, world_size=1, seed=0), 3)
        for x in batches:
            assert x.shape == (8, 3, res, res) and x.dtype == torch.float32 and x.is_contiguous()
            assert x.min() >= -1 and x.max() <= 1
        assert torch.cat(batches).std() > 0.1


@pytest.mark.parametrize("where", ["local", "s3"])
def test_ranks_draw_different_streams_and_a_seed_repeats_its_own(datasets, where):
    def first(rank: int, seed: int) -> torch.Tensor:
        stream = PhaseStream(datasets[where], 8, batch_size=16, rank=rank, world_size=2, seed=seed, num_workers=2)
        return torch.cat(take(stream, 4))

    a = first(0, 0)
    assert torch.equal(a, first(0, 0))
    for other in (first(1, 0), first(0, 1)):
        # no image of one stream's first 64 is at the same position in the other's
        assert not (a == other).flatten(1).all(1).any()


def test_one_shard_never_runs_dry_for_4_ranks_of_2_workers(tmp_path):
    url = f"file://{tmp_path}/one"
    prepare("builtin", url, resolution=8, limit=20, workers=1, progress=False)
    assert len(read_manifest(url).shards[8]) == 1
    iterators = [iter(PhaseStream(url, 8, batch_size=8, rank=r, world_size=4, seed=0, num_workers=2))
                 for r in range(4)]
    for _ in range(10):  # 80 samples a rank from a 20-sample shard, all ranks interleaved
        for it in iterators:
            assert next(it).shape == (8, 3, 8, 8)


def test_mirror_flips_some_samples_and_only_when_asked(tmp_path):
    (tmp_path / "src").mkdir()
    a = np.zeros((8, 8), np.uint8)
    a[:, :2] = 255
    Image.fromarray(a).save(tmp_path / "src" / "edge.png")
    prepare(str(tmp_path / "src"), str(tmp_path / "ds"), resolution=8, channels=1, workers=1, progress=False)
    image = torch.from_numpy(a).float() / 127.5 - 1
    for mirror in (True, False):
        x = take(PhaseStream(str(tmp_path / "ds"), 8, batch_size=64, rank=0, world_size=1, seed=0, mirror=mirror,
                             num_workers=0), 1)[0][:, 0]
        flipped = (x == image.flip(-1)).flatten(1).all(1)
        assert ((x == image).flatten(1).all(1) | flipped).all()
        assert 10 < flipped.sum() < 54 if mirror else flipped.sum() == 0


def copy_dataset(local: str, dest: str) -> None:
    if dest.startswith("s3://"):
        fs, root = filesystem(dest)
        fs.put(local + "/", root, recursive=True)
    else:
        shutil.copytree(local, dest)


def truncate(url: str, name: str) -> None:
    fs, root = filesystem(url)
    data = fs.cat_file(join(root, name))
    fs.pipe_file(join(root, name), data[: len(data) // 2 + 100])  # cuts a member in its data


def break_png(url: str, name: str) -> None:
    """Overwrite the first sample's PNG bytes with garbage of the same length: the tar itself stays valid."""
    fs, root = filesystem(url)
    data = bytearray(fs.cat_file(join(root, name)))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        data[member.offset_data : member.offset_data + member.size] = b"\x89PNG broken" * (member.size // 11) + bytes(
            member.size % 11)
    fs.pipe_file(join(root, name), bytes(data))


def flip_byte(url: str, name: str) -> None:
    fs, root = filesystem(url)
    data = bytearray(fs.cat_file(join(root, name)))
    data[len(data) // 3] ^= 0x01
    fs.pipe_file(join(root, name), bytes(data))


def rewrite_metadata(url: str, name: str) -> None:
    """A valid tar of the same size whose first sample claims another source: only its sha256 tells."""
    fs, root = filesystem(url)
    data = fs.cat_file(join(root, name))
    start = data.index(b'{"source": "builtin#')
    end = data.index(b'"}', start)
    fs.pipe_file(join(root, name), data[:start] + b'{"source": "elsewhere"}'.ljust(end + 2 - start) + data[end + 2:])


def replace_with_another_datasets_shard(url: str, name: str) -> None:
    other = f"{url}-other"
    prepare("builtin", other, resolution=16, shard_size=SHARD, limit=COUNT, seed=6, workers=1, progress=False)
    fs, root = filesystem(url)
    fs.pipe_file(join(root, name), fs.cat_file(join(filesystem(other)[1], name)))


def stored_images(data: bytes) -> set[bytes]:
    """The pixels of every PNG that can still be read from (possibly damaged) shard bytes."""
    found = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    with contextlib.suppress(Exception):
                        found.add(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read()))).tobytes())
    except (tarfile.TarError, EOFError):
        pass
    return found


def as_uint8(batch: torch.Tensor) -> list[bytes]:
    images = ((batch + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [a.tobytes() for a in images]


SIZE = r"is \d+ bytes, not the \d+ dataset.json records"
SHA = r"has sha256 [0-9a-f]{64}, not the [0-9a-f]{64} dataset.json records"
DAMAGES = [("local", truncate, SIZE), ("s3", truncate, SIZE), ("local", flip_byte, SHA), ("s3", flip_byte, SHA),
           ("local", break_png, SHA), ("local", rewrite_metadata, SHA),
           ("local", replace_with_another_datasets_shard, f"({SIZE}|{SHA})")]


@pytest.mark.parametrize("where, damage, problem", DAMAGES, ids=[f"{w}-{d.__name__}" for w, d, _ in DAMAGES])
def test_a_damaged_shard_is_skipped_whole_named_and_counted(datasets, tmp_path, s3_server, where, damage, problem):
    """Nothing of a shard that does not match dataset.json is used, not even the samples before the damage."""
    url = str(tmp_path / "ds") if where == "local" else f"s3://{s3_server.new_bucket()}/ds"
    copy_dataset(datasets["local"], url)
    name = "res-0016/shard-000002.tar"
    damage(url, name)
    fs, root = filesystem(url)
    damaged = fs.cat_file(join(root, name))
    forbidden = stored_images(damaged)
    assert len(forbidden) > 0
    stream = PhaseStream(url, 16, batch_size=16, rank=0, world_size=1, seed=0, num_workers=2, mirror=False,
                         max_corrupt_fraction=0.5)
    batches = take(stream, 60)  # 960 samples: each shard is drawn about 1.6 times
    assert all(x.shape == (16, 3, 16, 16) and x.abs().max() <= 1 for x in batches)
    assert not forbidden & {image for x in batches for image in as_uint8(x)}
    assert stream.corrupt_samples > 0 and stream.corrupt_samples % SHARD == 0  # the whole shard, each time drawn
    assert stream.samples_seen >= 960 + stream.corrupt_samples
    assert re.fullmatch(f"{re.escape(join(url, name))} {problem}; its {SHARD} samples are skipped",
                        stream.last_corrupt), stream.last_corrupt


@pytest.mark.parametrize("res, damaged, fraction", [(8, range(6), 0.01), (16, range(0, 6, 2), 0.2)])
def test_too_many_corrupt_samples_raise(datasets, tmp_path, res, damaged, fraction):
    url = str(tmp_path / "ds")
    copy_dataset(datasets["local"], url)
    shards = read_manifest(url).shards[res]
    for i in damaged:
        (truncate if res == 8 else flip_byte)(url, shards[i].name)
    stream = PhaseStream(url, res, batch_size=16, rank=0, world_size=1, seed=0, num_workers=2,
                         max_corrupt_fraction=fraction)
    with pytest.raises(DatasetError, match=rf"samples read at {res}x{res} were corrupt or unreadable, more than "
                                           rf".*\(last: {url}/res-00{res:02d}/shard-0000\d\d\.tar (is|has sha256)"):
        take(stream, 200)
    assert stream.corrupt_samples > 0


def reseal(url: str) -> None:
    """Record the shards' current sizes and sha256 in dataset.json: a dataset crafted to pass verification."""
    path = Path(url) / "dataset.json"
    manifest = json.loads(path.read_text())
    for shards in manifest["shards"].values():
        for shard in shards:
            data = (Path(url) / shard["name"]).read_bytes()
            shard["size"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    path.write_text(json.dumps(manifest))


def test_a_corrupt_sample_names_its_shard_key_and_source(datasets, tmp_path, caplog):
    url = str(tmp_path / "ds")
    copy_dataset(datasets["local"], url)
    name = "res-0016/shard-000002.tar"
    with tarfile.open(Path(url) / name) as tar:
        key = tar.getnames()[0].removesuffix(".json")
        source = json.loads(tar.extractfile(tar.getmembers()[0]).read())["source"]
    break_png(url, name)
    reseal(url)
    stream = PhaseStream(url, 16, batch_size=16, rank=0, world_size=1, seed=0, num_workers=0,
                         max_corrupt_fraction=0.0)
    expected = f"{url}/{name} sample {key} (source {source}) is not a readable RGB PNG of 16x16"
    assert source.startswith("builtin#")
    with caplog.at_level(logging.WARNING, logger="workers.data"):
        with pytest.raises(DatasetError, match=rf"\(last: {re.escape(expected)}\)$"):
            take(stream, 200)
    assert f"corrupt data skipped: {expected}" in caplog.messages


def test_a_shard_name_outside_the_dataset_is_refused(datasets, tmp_path):
    url = str(tmp_path / "ds")
    copy_dataset(datasets["local"], url)
    (tmp_path / "outside").mkdir()
    shutil.copy(Path(url) / "res-0008/shard-000000.tar", tmp_path / "outside" / "shard-x.tar")
    path = Path(url) / "dataset.json"
    path.write_text(path.read_text().replace('"res-0008/shard-000000.tar"', '"../outside/shard-x.tar"'))
    message = (f"{url}: dataset.json: shards.8.0.name: '../outside/shard-x.tar' is not "
               "res-0008/shard-NNNNNN.tar")
    with pytest.raises(DatasetError) as e:
        read_manifest(url)
    assert str(e.value) == message
    with pytest.raises(DatasetError, match=re.escape(message)):
        PhaseStream(url, 16, batch_size=4, rank=0, world_size=1, seed=0)


CRAFTED_READER = """import json, resource, sys
from itertools import islice
from workers.data import PhaseStream
stream = PhaseStream(sys.argv[1], 16, batch_size=4, rank=0, world_size=1, seed=0, num_workers=0,
                     max_corrupt_fraction=1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
batches = list(islice(iter(stream), 25))
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps([len(batches), stream.corrupt_samples, stream.samples_seen, growth]))
"""


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_tar_entries_that_are_not_regular_or_too_large_are_skipped_unread(tmp_path, fmt):
    """A shard crafted to pass verification (its sha256 and size in dataset.json) whose first sample is a sparse
    file that expands to 300 MB, second a link, and third a regular file larger than a 16x16 PNG can be."""
    url = tmp_path / "ds"
    prepare("builtin", str(url), resolution=16, shard_size=10, limit=20, seed=5, workers=1, progress=False)
    name = "res-0016/shard-000000.tar"
    entries = tmp_path / "entries"
    with tarfile.open(url / name) as tar:
        names = tar.getnames()
        tar.extractall(entries)
    with open(entries / "00000000.png", "r+b") as f:
        f.truncate(300 << 20)
    (entries / "00000001.png").unlink()
    (entries / "00000001.png").symlink_to("/etc/hostname")
    (entries / "00000002.png").write_bytes(bytes(200 << 10))
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(url / name), "-C", str(entries), *names],
                   check=True)
    assert (url / name).stat().st_size < 300 << 10
    reseal(str(url))

    out = subprocess.run([sys.executable, "-c", CRAFTED_READER, str(url)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, check=True)
    batches, corrupt, seen, growth_kib = json.loads(out.stdout.splitlines()[-1])
    assert batches == 25
    assert corrupt >= 3 and seen >= 100 + corrupt
    assert growth_kib < 32 << 10, f"peak RSS grew by {growth_kib} KiB"
    for problem in (f"{url / name} entry 00000000.png is not a regular file",
                    f"{url / name} entry 00000001.png is not a regular file",
                    f"{url / name} entry 00000002.png is 204800 bytes, more than a sample of this resolution can take"):
        assert f"corrupt data skipped: {problem}" in out.stderr


def shard_field(field: str, value: object, res: str = "8"):
    def edit(data: dict) -> None:
        data["shards"][res][0][field] = value
    return edit


BAD_FIELDS = [
    (lambda d: d.update(count=0), "count: Input should be greater than or equal to 1, got 0"),
    (lambda d: d.update(count="600"), "count: Input should be a valid integer, got '600'"),
    (lambda d: d.update(channels=2), "channels: Input should be 1 or 3, got 2"),
    (lambda d: d.update(resolutions=[4, 8, 12]), "resolutions: must be 4, 8, … up to a power of two from 8 to 1024"),
    (lambda d: d.update(resolutions=[4]), "resolutions: must be 4, 8, … up to a power of two from 8 to 1024"),
    (lambda d: d.update(resolutions=[4, 8, 16, 32]), "shards: resolutions [4, 8, 16] are not those of the dataset"),
    (lambda d: d.update(resolutions=[]), "resolutions: must be 4, 8, …"),
    (lambda d: d.update(shard_size=0), "shard_size: Input should be greater than or equal to 1, got 0"),
    (lambda d: d.update(shard_size=50), "shards.4.0.count: 100 is more than shard_size = 50"),
    (lambda d: d.pop("tool"), "tool: missing"),
    (lambda d: d.update(owner="me"), "owner: unknown field"),
    (lambda d: d["shards"].pop("16"), "shards: resolutions [4, 8] are not those of the dataset, [4, 8, 16]"),
    (shard_field("count", 0), "shards.8.0.count: Input should be greater than or equal to 1, got 0"),
    (shard_field("count", 99), "shards.8: the shards do not hold count = 600 samples"),
    (shard_field("name", "../outside/shard-x.tar"), "shards.8.0.name: '../outside/shard-x.tar' is not res-0008/"),
    (shard_field("name", "res-0016/shard-000000.tar"), "shards.8.0.name: 'res-0016/shard-000000.tar' is not res-0008/"),
    (shard_field("name", "/etc/res-0008/shard-000000.tar"), "shards.8.0.name: '/etc/res-0008/shard-000000.tar' is"),
    (shard_field("size", 10**12), "shards.8.0.size: 1000000000000 bytes is more than 100 samples of 8x8 can take"),
    (shard_field("size", -1), "shards.8.0.size: Input should be greater than or equal to 1024, got -1"),
    (shard_field("sha256", "ABC"), "shards.8.0.sha256: String should match pattern '^[0-9a-f]{64}$', got 'ABC'"),
]  # fmt: skip


@pytest.mark.parametrize("edit, message", BAD_FIELDS)
def test_each_bad_manifest_field_is_named(datasets, edit, message):
    data = json.loads(read_manifest(datasets["local"]).to_json())
    edit(data)
    with pytest.raises(DatasetError) as e:
        Manifest.from_json(json.dumps(data), "ds")
    assert str(e.value).startswith(f"ds: dataset.json: {message}") and "\n" not in str(e.value)


def test_incomplete_mismatched_and_malformed_datasets_are_refused(datasets, tmp_path):
    manifest = read_manifest(datasets["local"])
    with pytest.raises(DatasetError, match=r"has no 32x32 images \(it holds 4\.\.16\)"):
        check_dataset(manifest, 32, 3, datasets["local"])
    with pytest.raises(DatasetError, match=r"has 3 channel\(s\) but 1 are asked for"):
        check_dataset(manifest, 16, 1, datasets["local"])
    check_dataset(manifest, 16, 3, datasets["local"])
    with pytest.raises(DatasetError, match="has no 32x32 images"):
        PhaseStream(datasets["local"], 32, batch_size=4, rank=0, world_size=1, seed=0)

    url = str(tmp_path / "ds")
    copy_dataset(datasets["local"], url)
    (tmp_path / "ds" / "dataset.json").unlink()
    with pytest.raises(DatasetError, match="has no dataset.json: not a dataset or an incomplete prepare"):
        PhaseStream(url, 8, batch_size=4, rank=0, world_size=1, seed=0)
    (tmp_path / "ds" / "dataset.json").write_text(manifest.to_json().replace('"count": 600', '"count": 601'))
    with pytest.raises(DatasetError, match="dataset.json: shards.4: the shards do not hold count = 601 samples"):
        read_manifest(url)
    (tmp_path / "ds" / "dataset.json").write_text("{")
    with pytest.raises(DatasetError, match="dataset.json is not JSON"):
        read_manifest(url)
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_worker_processes_exit_when_the_iterator_is_dropped(datasets):
    before = set(multiprocessing.active_children())
    stream = PhaseStream(datasets["s3"], 8, batch_size=8, rank=0, world_size=1, seed=0, num_workers=2)
    it = iter(stream)
    next(it)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2 and all(p.is_alive() for p in workers)
    del it
    gc.collect()
    deadline = time.monotonic() + 20
    while any(p.is_alive() for p in workers):
        assert time.monotonic() < deadline, "DataLoader workers still running after the iterator was dropped"
        time.sleep(0.1)


def test_a_bad_path_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="has no dataset.json"):
        PhaseStream(str(tmp_path / "nothing-here"), 8, batch_size=4, rank=0, world_size=1, seed=0)


def test_one_damaged_shard_within_the_fraction_never_fails_the_stream(tmp_path):
    """250 shards of 16: one is 0.4 % of the data, under the 1 % allowed, even when it is the first one drawn."""
    from workers.data import _draw_shards
    from workers.prepare import prepare

    url = str(tmp_path / "ds")
    prepare("builtin", url, resolution=8, limit=4000, shard_size=16, workers=1, progress=False)
    _, first = next(_draw_shards(url, read_manifest(url).shards[4], 0, 0))
    flip_byte(url, first.name)
    stream = PhaseStream(url, 4, batch_size=16, rank=0, world_size=1, seed=0, num_workers=0, shuffle_buffer=16)
    assert len(take(stream, 30)) == 30
    assert stream.corrupt_samples >= 16 and stream.corrupt_samples % 16 == 0
