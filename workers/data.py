"""The dataset contract (manifest, shard names, errors) and the stream one training phase reads.

A dataset is one WebDataset shard set per resolution plus `dataset.json`, which `progan prepare`
(workers/prepare.py) writes last: without it a dataset is incomplete and nothing reads it. A phase at
resolution r reads only the `res-<r>` shards.

torch and webdataset are imported where the stream is built, so that `progan prepare` and its encoder
processes start without paying for them.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import random
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image

from service.spec import StorageOptions
from workers.storage import filesystem, join

if TYPE_CHECKING:
    from torch import Tensor

FORMAT_VERSION = 1
MANIFEST_NAME = "dataset.json"
MIN_SAMPLES_CHECKED = 100  # the corrupt fraction is judged only after this many samples
READ_BLOCK = 16 << 20  # bytes fetched per request from object storage
SHUFFLE_BYTES = 256 << 20  # a worker's shuffle buffer holds at most about this many pixel bytes


class DatasetError(ValueError):
    """A dataset that cannot be used or a source that cannot be prepared; the message names the problem."""


def resolution_dir(res: int) -> str:
    return f"res-{res:04d}"


def shard_name(res: int, index: int) -> str:
    return f"{resolution_dir(res)}/shard-{index:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:08d}"


def storage_errors() -> tuple[type[BaseException], ...]:
    """What fsspec backends raise for a wrong endpoint, bucket or credentials (s3fs lets some through raw)."""
    import aiohttp
    import botocore.exceptions

    return (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, aiohttp.ClientError)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclass(frozen=True)
class ShardInfo:
    name: str  # relative to the dataset, e.g. res-0032/shard-000000.tar
    count: int
    size: int
    sha256: str


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True)
class Manifest:
    """dataset.json: what a complete dataset holds."""

    resolutions: list[int]
    channels: int
    count: int
    shards: dict[int, list[ShardInfo]]
    skipped: list[Skipped]
    source: dict
    seed: int
    shard_size: int
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        data = {"version": self.version, **asdict(self)}
        data["shards"] = {str(res): [asdict(s) for s in shards] for res, shards in self.shards.items()}
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = MANIFEST_NAME) -> Manifest:
        try:
            data = json.loads(text)
            if data.get("version") != FORMAT_VERSION:
                raise DatasetError(f"{where}: dataset format version {data.get('version')!r} is not "
                                   f"{FORMAT_VERSION}; prepare the dataset again")
            manifest = cls(
                resolutions=[int(r) for r in data["resolutions"]],
                channels=int(data["channels"]),
                count=int(data["count"]),
                shards={int(r): [ShardInfo(**s) for s in shards] for r, shards in data["shards"].items()},
                skipped=[Skipped(**s) for s in data["skipped"]],
                source=dict(data["source"]),
                seed=int(data["seed"]),
                shard_size=int(data["shard_size"]),
            )
        except DatasetError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DatasetError(f"{where}: dataset.json is malformed ({type(e).__name__}: {first_line(e)})") from None
        for res in manifest.resolutions:
            if sum(s.count for s in manifest.shards.get(res, [])) != manifest.count:
                raise DatasetError(f"{where}: dataset.json is malformed (the res-{res} shards do not hold "
                                   f"{manifest.count} samples)")
        return manifest


def read_manifest(url: str, storage_options: StorageOptions | None = None) -> Manifest:
    fs, root = filesystem(url, storage_options)
    try:
        text = fs.cat_file(join(root, MANIFEST_NAME))
    except FileNotFoundError:
        raise DatasetError(f"{url} has no {MANIFEST_NAME}: not a dataset or an incomplete prepare") from None
    except storage_errors() as e:
        raise DatasetError(f"{url}: cannot read {MANIFEST_NAME}: {first_line(e)}") from None
    return Manifest.from_json(text, url)


def check_dataset(manifest: Manifest, resolution: int, channels: int, url: str) -> None:
    """Refuse a dataset that cannot feed a run at this resolution and channel count."""
    if resolution not in manifest.resolutions:
        raise DatasetError(f"{url} has no {resolution}x{resolution} images (it holds "
                           f"{manifest.resolutions[0]}..{manifest.resolutions[-1]}); prepare it with "
                           f"--resolution {resolution} or higher")
    if channels != manifest.channels:
        raise DatasetError(f"{url} has {manifest.channels} channel(s) but {channels} are asked for; "
                           f"prepare it with --channels {channels}")


class PhaseStream:
    """An infinite stream of (batch, C, res, res) float batches in [-1, 1] for one rank in one phase.

    Every rank and DataLoader worker draws shards with replacement (weighted by their sample counts) from its
    own seeded generator, so no rank runs dry or waits for another whatever the shard and worker counts;
    `world_size` only documents the group. Batches are decoded and collated in the worker processes; each
    carries its worker's running (corrupt, seen) counts, which is how skipped samples reach `corrupt_samples`.
    """

    def __init__(self, url: str, resolution: int, batch_size: int, rank: int, world_size: int, seed: int,
                 storage_options: StorageOptions | None = None, mirror: bool = True, num_workers: int = 2,
                 shuffle_buffer: int = 1000, max_corrupt_fraction: float = 0.01):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size {batch_size}, rank {rank}, world_size {world_size}: not a valid stream")
        self.url = url.rstrip("/")
        self.manifest = read_manifest(self.url, storage_options)
        check_dataset(self.manifest, resolution, self.manifest.channels, self.url)
        self.resolution, self.batch_size, self.rank, self.world_size = resolution, batch_size, rank, world_size
        self.seed, self.storage_options, self.mirror, self.num_workers = seed, storage_options, mirror, num_workers
        pixel_bytes = resolution * resolution * self.manifest.channels
        self.shuffle_buffer = max(1, min(shuffle_buffer, max(batch_size, SHUFFLE_BYTES // pixel_bytes)))
        self.max_corrupt_fraction = max_corrupt_fraction
        self.corrupt_samples = 0
        self.samples_seen = 0

    def _pipeline(self):
        import webdataset as wds

        shards = self.manifest.shards[self.resolution]
        return wds.DataPipeline(
            partial(_draw_shards, [join(self.url, s.name) for s in shards], [s.count for s in shards],
                    self.seed, self.rank),
            partial(_read_shards, storage_options=self.storage_options),
            partial(_shuffle, bufsize=self.shuffle_buffer, seed=self.seed, rank=self.rank),
            partial(_batches, resolution=self.resolution, channels=self.manifest.channels,
                    batch_size=self.batch_size, mirror=self.mirror, seed=self.seed, rank=self.rank),
        )

    def __iter__(self) -> Iterator[Tensor]:
        from torch.utils.data import DataLoader

        loader = DataLoader(self._pipeline(), batch_size=None, num_workers=self.num_workers, pin_memory=False,
                            prefetch_factor=2 if self.num_workers else None,
                            multiprocessing_context=_worker_context() if self.num_workers else None)
        base_corrupt, base_seen = self.corrupt_samples, self.samples_seen
        counts: dict[int, tuple[int, int]] = {}
        # Dropping this generator drops the DataLoader iterator with it, which shuts its worker processes down.
        for images, worker, corrupt, seen, reason in loader:
            counts[worker] = (corrupt, seen)
            self.corrupt_samples = base_corrupt + sum(c for c, _ in counts.values())
            self.samples_seen = base_seen + sum(s for _, s in counts.values())
            if (self.samples_seen >= MIN_SAMPLES_CHECKED
                    and self.corrupt_samples > self.max_corrupt_fraction * self.samples_seen):
                raise DatasetError(
                    f"{self.url}: {self.corrupt_samples} of {self.samples_seen} samples read at "
                    f"{self.resolution}x{self.resolution} were corrupt or unreadable, more than "
                    f"{self.max_corrupt_fraction:.1%} (last: {reason})")
            if images is not None:
                yield images


def _worker_context() -> multiprocessing.context.BaseContext:
    """forkserver, not fork: a forked worker would share the epoll set of the parent's s3fs event loop, and its
    cleanup of the inherited connections would unregister them there too, stalling the parent's next request
    (fsspec's async filesystems are not fork-safe, fsspec/s3fs#914). The server imports the main module (a Ray
    worker's, say), torch, webdataset and s3fs once, so that starting a phase's workers costs a fork."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "workers.data", "webdataset", "s3fs"])
    return context


class _Bad(NamedTuple):
    """A sample cut off by a truncated shard, or a whole shard that cannot be read: one corrupt sample."""

    reason: str


def _worker_id() -> int:
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return info.id if info is not None else 0


def _stream_seed(seed: int, rank: int, worker: int, purpose: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{rank}/{worker}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _draw_shards(urls: list[str], counts: list[int], seed: int, rank: int) -> Iterator[tuple[str, int]]:
    """Shards drawn with replacement in proportion to their sample counts (wds.ResampledShards draws them
    uniformly, which would show the samples of a short last shard several times as often as the others)."""
    rng = random.Random(_stream_seed(seed, rank, _worker_id(), "shards"))
    while True:
        index = rng.choices(range(len(urls)), weights=counts)[0]
        yield urls[index], counts[index]


def _read_shards(draws: Iterator[tuple[str, int]], storage_options: StorageOptions | None
                 ) -> Iterator[tuple[str, bytes] | _Bad]:
    """(where, PNG bytes) of every sample of each drawn shard, then a _Bad if it ended before the manifest's
    count."""
    for url, expected in draws:
        fs, path = filesystem(url, storage_options)
        got, reason = 0, "the shard ends early"
        try:
            with fs.open(path, "rb", block_size=READ_BLOCK) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".png"):
                        data = tar.extractfile(member).read()
                        got += 1
                        yield f"{url}:{member.name}", data
        except (tarfile.TarError, EOFError, *storage_errors()) as e:
            reason = first_line(e)
        if got < expected:
            yield _Bad(f"{url}: {reason}")


def _shuffle(items: Iterator, bufsize: int, seed: int, rank: int) -> Iterator:
    import webdataset as wds

    rng = random.Random(_stream_seed(seed, rank, _worker_id(), "shuffle"))
    return wds.shuffle(bufsize, initial=min(bufsize, 128), rng=rng)(items)


def _decode(data: bytes, mode: str, resolution: int) -> np.ndarray | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode != mode or image.size != (resolution, resolution):
                return None
            return np.asarray(image)
    except Exception:  # any decoder failure on stored bytes means a corrupt sample, never a bug here
        return None


def _batches(items: Iterator[tuple[str, bytes] | _Bad], resolution: int, channels: int, batch_size: int, mirror: bool,
             seed: int, rank: int) -> Iterator[tuple]:
    """(images or None, worker, corrupt, seen, last reason): the counts are this worker's running totals.
    A None batch reports a run of corrupt samples so that the main process can judge even if nothing decodes."""
    import torch

    worker = _worker_id()
    rng = random.Random(_stream_seed(seed, rank, worker, "mirror"))
    mode = "L" if channels == 1 else "RGB"
    batch: list[np.ndarray] = []
    corrupt = seen = reported = 0
    reason = ""
    for item in items:
        seen += 1
        if isinstance(item, _Bad):
            corrupt, reason = corrupt + 1, item.reason
        else:
            where, data = item
            image = _decode(data, mode, resolution)
            if image is None:
                corrupt, reason = corrupt + 1, f"{where} is not a readable {mode} PNG of {resolution}x{resolution}"
            else:
                batch.append(image[:, ::-1] if mirror and rng.random() < 0.5 else image)
        if len(batch) == batch_size:
            x = torch.from_numpy(np.stack(batch))
            x = x[:, None] if channels == 1 else x.permute(0, 3, 1, 2)
            images = x.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1)
            yield images, worker, corrupt, seen, reason
            batch, reported = [], corrupt
        elif corrupt - reported >= MIN_SAMPLES_CHECKED:
            yield None, worker, corrupt, seen, reason
            reported = corrupt
