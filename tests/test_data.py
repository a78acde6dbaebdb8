"""The per-phase stream: real shards on a local disk and on a real S3 server, read through DataLoader worker
processes; corruption is made by editing real shard bytes."""

from __future__ import annotations

import gc
import io
import multiprocessing
import shutil
import tarfile
import time
from itertools import islice

import numpy as np
import pytest
import torch
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
        member = tar.getmembers()[0]
        data[member.offset_data : member.offset_data + member.size] = b"\x89PNG broken" * (member.size // 11) + bytes(
            member.size % 11)
    fs.pipe_file(join(root, name), bytes(data))


@pytest.mark.parametrize("where, damage", [("local", truncate), ("s3", truncate), ("local", break_png)])
def test_corrupt_samples_are_skipped_and_counted_while_batches_flow(datasets, tmp_path, s3_server, where, damage):
    url = str(tmp_path / "ds") if where == "local" else f"s3://{s3_server.new_bucket()}/ds"
    copy_dataset(datasets["local"], url)
    damage(url, "res-0016/shard-000002.tar")
    stream = PhaseStream(url, 16, batch_size=16, rank=0, world_size=1, seed=0, num_workers=2,
                         max_corrupt_fraction=0.05)
    batches = take(stream, 60)  # 960 samples: each shard is drawn about 1.6 times
    assert all(x.shape == (16, 3, 16, 16) and x.abs().max() <= 1 for x in batches)
    assert stream.corrupt_samples > 0
    assert stream.samples_seen >= 960 + stream.corrupt_samples
    if damage is break_png:  # one bad sample in one of six shards
        assert stream.corrupt_samples <= stream.samples_seen / SHARD


def test_too_many_corrupt_samples_raise(datasets, tmp_path):
    url = str(tmp_path / "ds")
    copy_dataset(datasets["local"], url)
    for shard in read_manifest(url).shards[8]:
        truncate(url, shard.name)
    stream = PhaseStream(url, 8, batch_size=16, rank=0, world_size=1, seed=0, num_workers=2)
    with pytest.raises(DatasetError, match=r"samples read at 8x8 were corrupt or unreadable, more than 1\.0%"):
        take(stream, 100)
    assert stream.corrupt_samples > 0


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
    with pytest.raises(DatasetError, match="dataset.json is malformed"):
        read_manifest(url)
    (tmp_path / "ds" / "dataset.json").write_text("{")
    with pytest.raises(DatasetError, match="dataset.json is malformed"):
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
