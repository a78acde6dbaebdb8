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
import logging
import multiprocessing
import random
import re
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from functools import partial
from typing import TYPE_CHECKING, Annotated, Literal, NamedTuple

import numpy as np
from PIL import Image
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from service.spec import MAX_RESOLUTION, MIN_RESOLUTION, StorageOptions, is_power_of_two, resolutions_up_to
from workers.storage import StorageUnavailable, filesystem, first_line, join, storage_errors, with_retries

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: a `<key>.json` with the sample's source beside each `<key>.png`; `tool` in dataset.json
MANIFEST_NAME = "dataset.json"
SHARD_NAME = re.compile(r"res-(\d{4})/shard-\d{6}\.tar")
MIN_SAMPLES_CHECKED = 100  # the corrupt fraction is judged only after this many samples…
MIN_SHARDS_CHECKED = 10  # …and this many shards' worth, so that one bad shard drawn first does not decide it
READ_BLOCK = 16 << 20  # bytes fetched per request from object storage
SPOOL_BYTES = 64 << 20  # a shard being verified is held in memory up to this size, on local disk above it
SHUFFLE_BYTES = 256 << 20  # a worker's shuffle buffer holds at most about this many pixel bytes
METADATA_BYTES = 64 << 10  # the most a sample's `<key>.json` may take
REGULAR_FILE = (tarfile.REGTYPE, tarfile.AREGTYPE)


class DatasetError(ValueError):
    """A dataset that cannot be used or a source that cannot be prepared; the message names the problem."""


def resolution_dir(res: int) -> str:
    return f"res-{res:04d}"


def shard_name(res: int, index: int) -> str:
    return f"{resolution_dir(res)}/shard-{index:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:08d}"


def max_png_bytes(res: int, channels: int) -> int:
    """The most a stored res x res PNG may take: its raw rows (a filter byte each) plus deflate's worst-case
    growth (under 0.1%) and room for the chunk headers. A larger tar entry is refused unread."""
    raw = res * (res * channels + 1)
    return raw + raw // 64 + 4096


def max_shard_bytes(res: int, channels: int, count: int) -> int:
    """The most a shard of `count` samples may take: per sample a header and padded data for the PNG and the
    metadata, then the end-of-archive blocks and a tar record of padding."""
    def entry(size: int) -> int:
        return tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE

    return count * (entry(max_png_bytes(res, channels)) + entry(METADATA_BYTES)) + tarfile.RECORDSIZE


def tool_version() -> str:
    from importlib.metadata import version

    return f"progan-service {version('progan-service')}"


_STRICT = ConfigDict(extra="forbid", strict=True)


@dataclass(frozen=True, config=_STRICT)
class ShardInfo:
    name: str  # relative to the dataset, e.g. res-0032/shard-000000.tar
    count: Annotated[int, Field(ge=1)]
    size: Annotated[int, Field(ge=2 * tarfile.BLOCKSIZE)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


@dataclass(frozen=True, config=_STRICT)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True, config=_STRICT)
class Manifest:
    """dataset.json: what a complete dataset holds. Every field is checked when it is read, so that a reader
    never opens a path outside the dataset or trusts a size it did not bound."""

    resolutions: list[int]
    channels: Literal[1, 3]
    count: Annotated[int, Field(ge=1)]
    shards: dict[int, list[ShardInfo]]
    skipped: list[Skipped]
    source: dict
    seed: int
    shard_size: Annotated[int, Field(ge=1)]
    tool: str
    version: int = FORMAT_VERSION

    @field_validator("resolutions")
    @classmethod
    def _resolutions(cls, v: list[int]) -> list[int]:
        top = v[-1] if v else 0
        if not is_power_of_two(top) or not MIN_RESOLUTION <= top <= MAX_RESOLUTION or v != resolutions_up_to(top):
            raise ValueError(f"must be 4, 8, … up to a power of two from {MIN_RESOLUTION} to {MAX_RESOLUTION}, "
                             f"got {v}")
        return v

    @model_validator(mode="after")
    def _shards(self) -> Manifest:
        if sorted(self.shards) != self.resolutions:
            raise ValueError(f"shards: resolutions {sorted(self.shards)} are not those of the dataset, "
                             f"{self.resolutions}")
        for res, shards in self.shards.items():
            if sum(s.count for s in shards) != self.count:
                raise ValueError(f"shards.{res}: the shards do not hold count = {self.count} samples")
            for i, s in enumerate(shards):
                match = SHARD_NAME.fullmatch(s.name)
                if match is None or int(match[1]) != res:
                    raise ValueError(f"shards.{res}.{i}.name: {s.name!r} is not "
                                     f"{resolution_dir(res)}/shard-NNNNNN.tar")
                if s.count > self.shard_size:
                    raise ValueError(f"shards.{res}.{i}.count: {s.count} is more than shard_size = {self.shard_size}")
                if s.size > max_shard_bytes(res, self.channels, s.count):
                    raise ValueError(f"shards.{res}.{i}.size: {s.size} bytes is more than {s.count} samples of "
                                     f"{res}x{res} can take")
        return self

    def to_json(self) -> str:
        data = {"version": self.version, **asdict(self)}
        data["shards"] = {str(res): [asdict(s) for s in shards] for res, shards in self.shards.items()}
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = MANIFEST_NAME) -> Manifest:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise DatasetError(f"{where}: {MANIFEST_NAME} is not JSON ({first_line(e)})") from None
        if not isinstance(data, dict):
            raise DatasetError(f"{where}: {MANIFEST_NAME} is not a JSON object")
        if data.get("version") != FORMAT_VERSION:
            raise DatasetError(f"{where}: dataset format version {data.get('version')!r} is not "
                               f"{FORMAT_VERSION}; prepare the dataset again")
        try:
            return _MANIFEST.validate_json(text)
        except ValidationError as e:
            raise DatasetError(f"{where}: {MANIFEST_NAME}: {_validation_message(e)}") from None


_MANIFEST = TypeAdapter(Manifest)


def _validation_message(e: ValidationError) -> str:
    """The first problem, as `field.path: reason`."""
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        msg = "missing"
    elif first["type"] == "unexpected_keyword_argument":
        msg = "unknown field"
    elif loc and isinstance(first.get("input"), (int, float, str)):
        msg += f", got {first['input']!r}"
    return f"{loc}: {msg}" if loc else msg  # a whole-manifest check names its field in the message


def read_manifest(url: str, storage_options: StorageOptions | None = None) -> Manifest:
    fs, root = filesystem(url, storage_options)
    budget = (storage_options or StorageOptions()).retry_seconds
    try:
        text = with_retries(lambda: fs.cat_file(join(root, MANIFEST_NAME)), f"{url}: read {MANIFEST_NAME}", budget)
    except FileNotFoundError:
        raise DatasetError(f"{url} has no {MANIFEST_NAME}: not a dataset or an incomplete prepare") from None
    except StorageUnavailable:
        raise
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
    `world_size` only documents the group. Each drawn shard is verified against dataset.json before any of its
    samples is used (see `_read_shards`). Batches are decoded and collated in the worker processes; each
    carries its worker's running (corrupt, seen) counts, which is how skipped samples reach `corrupt_samples`.
    """

    def __init__(self, url: str, resolution: int, batch_size: int, rank: int, world_size: int, seed: int,
                 storage_options: StorageOptions | None = None, mirror: bool = True, num_workers: int = 2,
                 shuffle_buffer: int = 1000, max_corrupt_fraction: float = 0.01, pin_memory: bool = False):
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
        self.pin_memory = pin_memory  # page-locked batches, so the copy to a GPU runs without blocking the step
        shards = self.manifest.shards[resolution]
        self.min_checked = max(MIN_SAMPLES_CHECKED, MIN_SHARDS_CHECKED * -(-self.manifest.count // len(shards)))
        self.shard_share = max(s.count for s in shards) / self.manifest.count  # of the largest shard
        self.corrupt_samples = 0
        self.samples_seen = 0
        self.last_corrupt = ""  # what was wrong with the latest corrupt sample or shard

    def _pipeline(self):
        import webdataset as wds

        shards = self.manifest.shards[self.resolution]
        return wds.DataPipeline(
            partial(_draw_shards, self.url, shards, self.seed, self.rank),
            partial(_read_shards, resolution=self.resolution, channels=self.manifest.channels,
                    storage_options=self.storage_options),
            partial(_shuffle, bufsize=self.shuffle_buffer, seed=self.seed, rank=self.rank),
            partial(_batches, resolution=self.resolution, channels=self.manifest.channels,
                    batch_size=self.batch_size, mirror=self.mirror, seed=self.seed, rank=self.rank),
        )

    def __iter__(self) -> Iterator[Tensor]:
        from torch.utils.data import DataLoader

        loader = DataLoader(self._pipeline(), batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=2 if self.num_workers else None,
                            multiprocessing_context=_worker_context() if self.num_workers else None)
        base_corrupt, base_seen = self.corrupt_samples, self.samples_seen
        counts: dict[int, tuple[int, int, frozenset[str]]] = {}
        # Dropping this generator drops the DataLoader iterator with it, which shuts its worker processes down.
        for images, worker, corrupt, seen, reason, bad_shards in loader:
            counts[worker] = (corrupt, seen, bad_shards)
            self.corrupt_samples = base_corrupt + sum(c for c, *_ in counts.values())
            self.samples_seen = base_seen + sum(s for _, s, _ in counts.values())
            self.last_corrupt = reason or self.last_corrupt
            bad = frozenset().union(*(b for *_, b in counts.values()))
            # A damaged shard is its own share of the data, however often the draw happens to repeat it early on:
            # where one shard is within the allowed fraction, the fraction decides only once two shards are bad.
            if (self.samples_seen >= self.min_checked
                    and (self.shard_share > self.max_corrupt_fraction or len(bad) >= 2)
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


class _Sample(NamedTuple):
    shard: str  # URL
    key: str
    source: str  # where prepare took it from (dataset.json's source says of what)
    png: bytes

    def where(self) -> str:
        return f"{self.shard} sample {self.key} (source {self.source})"


class _Bad(NamedTuple):
    """Samples that cannot be used: a whole shard that fails verification counts as all of its samples."""

    reason: str
    shard: str  # URL
    samples: int = 1


def _worker_id() -> int:
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return info.id if info is not None else 0


def _stream_seed(seed: int, rank: int, worker: int, purpose: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{rank}/{worker}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _draw_shards(url: str, shards: list[ShardInfo], seed: int, rank: int) -> Iterator[tuple[str, ShardInfo]]:
    """Shards drawn with replacement in proportion to their sample counts (wds.ResampledShards draws them
    uniformly, which would show the samples of a short last shard several times as often as the others)."""
    rng = random.Random(_stream_seed(seed, rank, _worker_id(), "shards"))
    while True:
        shard = rng.choices(shards, weights=[s.count for s in shards])[0]
        yield join(url, shard.name), shard


def _read_shards(draws: Iterator[tuple[str, ShardInfo]], resolution: int, channels: int,
                 storage_options: StorageOptions | None) -> Iterator[_Sample | _Bad]:
    """The samples of each drawn shard, verified first: its bytes are hashed and counted as they stream in
    from storage into a spool (memory up to SPOOL_BYTES, local disk above), and only a shard whose size and
    sha256 match dataset.json is opened as a tar. A shard that does not match yields one _Bad for all of its
    samples and nothing else, so that no sample of a damaged or replaced shard is ever trained on; the price is
    one copy of each shard and the shard's download time before its first sample. A store that is unreachable
    is waited for (the whole download is retried, see `with_retries`), never taken for a damaged shard."""
    max_png = max_png_bytes(resolution, channels)
    budget = (storage_options or StorageOptions()).retry_seconds
    for url, shard in draws:
        with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as spool:
            try:
                problem = with_retries(partial(_fetch_verified, url, shard, spool, storage_options),
                                       f"{url}: read the shard", budget)
            except StorageUnavailable:
                raise
            except storage_errors() as e:
                problem = f"cannot be read ({first_line(e)})"
            if problem:
                yield _Bad(f"{url} {problem}; its {shard.count} samples are skipped", url, shard.count)
                continue
            spool.seek(0)
            yield from _shard_samples(url, spool, shard.count, max_png)


def _fetch_verified(url: str, shard: ShardInfo, spool, storage_options: StorageOptions | None) -> str | None:
    """Copy the shard into spool, reading at most one byte more than dataset.json records; what is wrong, if
    anything."""
    fs, path = filesystem(url, storage_options)
    digest, size = hashlib.sha256(), 0
    spool.seek(0)
    spool.truncate()  # a retried download starts over
    with fs.open(path, "rb", block_size=READ_BLOCK) as f:
        while block := f.read(min(READ_BLOCK, shard.size + 1 - size)):
            size += len(block)
            if size > shard.size:
                return f"is larger than the {shard.size} bytes dataset.json records"
            digest.update(block)
            spool.write(block)
    if size != shard.size:
        return f"is {size} bytes, not the {shard.size} dataset.json records"
    if digest.hexdigest() != shard.sha256:
        return f"has sha256 {digest.hexdigest()}, not the {shard.sha256} dataset.json records"
    return None


def _shard_samples(url: str, file, expected: int, max_png: int) -> Iterator[_Sample | _Bad]:
    """(shard, key, source, PNG) for each `<key>.png` after its `<key>.json`. An entry that is not a regular file
    or is larger than its bound is skipped unread (tarfile seeks past it) and counted as a corrupt sample."""
    got, reason = 0, "ends early"
    sources: dict[str, str] = {}  # of the current key only
    try:
        with tarfile.open(fileobj=file, mode="r:") as tar:
            for member in tar:
                key, _, kind = member.name.partition(".")
                if kind not in ("png", "json"):
                    continue
                entry = f"{url} entry {member.name}"
                if kind == "png":
                    got += 1
                if member.type not in REGULAR_FILE or member.issparse():
                    yield _Bad(f"{entry} is not a regular file", url)
                elif member.size > (max_png if kind == "png" else METADATA_BYTES):
                    yield _Bad(f"{entry} is {member.size} bytes, more than a sample of this resolution can take", url)
                elif kind == "json":
                    sources = {key: _source_of(tar.extractfile(member).read())}
                else:
                    yield _Sample(url, key, sources.get(key, "unknown"), tar.extractfile(member).read())
        reason = f"holds {got} of the {expected} samples dataset.json records"
    except (tarfile.TarError, EOFError) as e:
        reason = f"is not a readable tar ({first_line(e)})"
    if got < expected:
        yield _Bad(f"{url} {reason}", url, expected - got)


def _source_of(metadata: bytes) -> str:
    try:
        return str(json.loads(metadata)["source"])
    except (ValueError, KeyError, TypeError):
        return "unknown"


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


def _batches(items: Iterator[_Sample | _Bad], resolution: int, channels: int, batch_size: int, mirror: bool,
             seed: int, rank: int) -> Iterator[tuple]:
    """(images or None, worker, corrupt, seen, last reason, shards with a corrupt sample): this worker's running
    totals.
    A None batch reports a run of corrupt samples so that the main process can judge even if nothing decodes.
    Each distinct problem is logged once per worker, naming the shard, and for a sample its key and source."""
    import torch

    worker = _worker_id()
    rng = random.Random(_stream_seed(seed, rank, worker, "mirror"))
    mode = "L" if channels == 1 else "RGB"
    batch: list[np.ndarray] = []
    corrupt = seen = reported = 0
    reason = ""
    logged: set[str] = set()
    bad_shards: set[str] = set()
    for item in items:
        if isinstance(item, _Bad):
            problem, n, shard = item.reason, item.samples, item.shard
        else:
            image = _decode(item.png, mode, resolution)
            problem, n, shard = None, 1, item.shard
            if image is None:
                problem = f"{item.where()} is not a readable {mode} PNG of {resolution}x{resolution}"
            else:
                batch.append(image[:, ::-1] if mirror and rng.random() < 0.5 else image)
        seen += n
        if problem is not None:
            corrupt, reason = corrupt + n, problem
            bad_shards.add(shard)
            if problem not in logged:
                logged.add(problem)
                log.warning("corrupt data skipped: %s", problem)
        if len(batch) == batch_size:
            x = torch.from_numpy(np.stack(batch))
            x = x[:, None] if channels == 1 else x.permute(0, 3, 1, 2)
            images = x.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1)
            yield images, worker, corrupt, seen, reason, frozenset(bad_shards)
            batch, reported = [], corrupt
        elif corrupt - reported >= MIN_SAMPLES_CHECKED:
            yield None, worker, corrupt, seen, reason, frozenset(bad_shards)
            reported = corrupt
