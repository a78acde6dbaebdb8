"""`progan prepare`: images → a multi-resolution WebDataset (DESIGN.md, "Dataset").

Sources, and what is done to each image:
- a folder (recursive), .zip or uncompressed .tar of JPEG/PNG/WebP/BMP files of any size and mode: EXIF
  orientation applied, transparency composited over white, centre-cropped to a square, Lanczos-resized to N;
- MNIST-style idx files (a folder with train-images-idx3-ubyte[.gz] and optionally t10k-…, train first, or one
  such file): 28×28 padded by 2 pixels of background (0) to 32×32 as the reference code does, so that at
  N = 32 no pixel is resampled; for N ≠ 32 the padded image is Lanczos-resized;
- CIFAR-10 python batches (data_batch_*; the training set): 32×32, Lanczos-resized for N ≠ 32;
- `builtin`: procedural shapes on gradient backgrounds, deterministic by seed, needing no download.
`limit` takes the first candidates in source order (sorted paths), before the seeded shuffle. A source file
larger than MAX_SOURCE_BYTES (by its declared size, and reads are capped there) or of more than
MAX_SOURCE_PIXELS is skipped; idx headers and CIFAR batches are checked against what their files can hold.

Every sample records its source (the candidate's name: a relative path, an archive member, `file#index`, or
`builtin#index`) in a `<key>.json` beside its PNG; dataset.json describes the source and names the tool version.
DEST is only ever cleared of what prepare itself writes (dataset.json and `res-NNNN/shard-NNNNNN.tar`).

Each lower resolution is the 2×2 box average of the stored one above, rounded half to even (np.rint). Images
are decoded, resized and PNG-encoded in `workers` spawned processes (so a script calling prepare() needs the
usual `if __name__ == "__main__":` guard), with a few chunks in flight at a time, so memory does not grow
with the source. Shards are written in the shuffled order; dataset.json is written last.
"""

from __future__ import annotations

import abc
import colorsys
import gzip
import hashlib
import io
import json
import math
import multiprocessing
import os
import pickle
import re
import signal
import tarfile
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from service.spec import MAX_RESOLUTION, MIN_RESOLUTION, StorageOptions, is_power_of_two, resolutions_up_to
from workers.data import (
    MANIFEST_NAME,
    REGULAR_FILE,
    DatasetError,
    Manifest,
    ShardInfo,
    Skipped,
    resolution_dir,
    sample_key,
    shard_name,
    tool_version,
)
from workers.storage import filesystem, first_line, join, storage_errors, write_atomic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_SOURCE_BYTES = 64 << 20  # a source image file larger than this is skipped unread…
MAX_SOURCE_PIXELS = 1 << 26  # …and one of more pixels than this (8192²) skipped undecoded
MAX_NAME_CHARS = 4096  # an archive member with a longer name is not a candidate (its provenance must fit)
CIFAR_BATCH_BYTES = 64 << 20  # a CIFAR-10 python batch is about 31 MB
BUILTIN_COUNT = 10_000
CHUNK_PIXELS = 1 << 22  # a task sent to an encoder process holds up to 64 images of at most this many pixels
CHUNK_BYTES = 32 << 20  # …and of at most this many source bytes
WRITE_BLOCK = 8 << 20  # multipart block of a shard upload
PNG_LEVEL = 1  # zlib level: stored PNGs barely shrink at higher levels but encode several times slower
LANCZOS = Image.Resampling.LANCZOS
WRITE_PROBE = "_write-probe"
# What prepare writes, and so all it ever removes: dataset.json (and the temporary name it is written under),
# the write probe, the res-NNNN folders and the shards in them.
DATASET_FILE = re.compile(rf"{re.escape(MANIFEST_NAME)}(\.tmp)?|{WRITE_PROBE}|res-\d{{4}}/shard-\d{{6}}\.tar")
DATASET_DIR = re.compile(r"res-\d{4}")


def prepare(source: str, dest: str, *, resolution: int, channels: int = 3, shard_size: int = 1000,
            limit: int | None = None, seed: int = 0, workers: int = 2, overwrite: bool = False,
            storage_options: StorageOptions | None = None, progress: bool = True) -> Manifest:
    """Write `dest`/res-0004 … res-N shards and then `dest`/dataset.json; return the manifest."""
    if not is_power_of_two(resolution) or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise DatasetError(f"--resolution must be a power of two from {MIN_RESOLUTION} to {MAX_RESOLUTION}, "
                           f"got {resolution}")
    if channels not in (1, 3):
        raise DatasetError(f"--channels must be 1 or 3, got {channels}")
    if shard_size < 1:
        raise DatasetError(f"--shard-size must be at least 1, got {shard_size}")
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be at least 1, got {limit}")
    src = open_source(source, limit)
    fs, root = filesystem(dest, storage_options)
    created = _claim(fs, root, dest, overwrite)

    resolutions = resolutions_up_to(resolution)
    order = np.random.default_rng(seed % 2**63).permutation(len(src.names))
    encode = partial(_encode_chunk, src.kind, resolution=resolution, channels=channels, seed=seed)
    skipped: list[Skipped] = []
    try:
        writer = _DatasetWriter(fs, root, resolutions, shard_size)
        with _progress_bar(progress, len(order)) as advance:
            for name, result in _encoded(src, order, resolution, encode, workers):
                if isinstance(result, str):
                    skipped.append(Skipped(name, result))
                else:
                    writer.add(result, name)
                advance()
        shards = writer.close()
        if writer.count == 0:
            if created:
                fs.rmdir(root)  # empty: nothing is written before the first image
            first = f" (first: {skipped[0].path}: {skipped[0].reason})" if skipped else ""
            raise DatasetError(f"{source}: none of its {len(order)} images could be read{first}")
        manifest = Manifest(resolutions=resolutions, channels=channels, count=writer.count, shards=shards,
                            skipped=skipped, source=src.describe(), seed=seed, shard_size=shard_size,
                            tool=tool_version())
        write_atomic(fs, join(root, MANIFEST_NAME), manifest.to_json().encode())
    except storage_errors() as e:
        raise DatasetError(f"cannot write to {dest}: {first_line(e)}") from None
    return manifest


def _claim(fs, root: str, dest: str, overwrite: bool) -> bool:
    """Refuse a complete dataset, or a folder holding anything but dataset files, unless overwriting; remove
    the dataset files an earlier prepare left (never anything else, even with --overwrite); and prove that
    `dest` is writable before any work is done. True if this created the local folder `dest`."""
    try:
        if fs.isfile(root):
            raise DatasetError(f"{dest} is a file; DEST must be a folder or a URL prefix")
        files, dirs, foreign = _dataset_entries(fs, root)
        created = isinstance(fs, LocalFileSystem) and not fs.exists(root)
        if MANIFEST_NAME in files and not overwrite:
            raise DatasetError(f"{dest} already holds a complete dataset ({MANIFEST_NAME}); "
                               "pass --overwrite to replace it")
        if foreign and not overwrite:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise DatasetError(f"{dest} is not empty and not a dataset (it holds {foreign[0]}{more}); choose an "
                               "empty DEST, or pass --overwrite to replace only the dataset files there")
        for name in sorted(files, key=lambda f: f != MANIFEST_NAME):  # the manifest first: from then on
            fs.rm_file(join(root, name))  # readers see an incomplete dataset
        if isinstance(fs, LocalFileSystem):
            for name in dirs:
                if not fs.ls(join(root, name)):
                    fs.rmdir(join(root, name))
            fs.makedirs(root, exist_ok=True)
        probe = join(root, WRITE_PROBE)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except storage_errors() as e:
        raise DatasetError(f"cannot write to {dest}: {first_line(e)}") from None
    return created


def _dataset_entries(fs, root: str) -> tuple[list[str], list[str], list[str]]:
    """What is under root, relative to it: (dataset files, dataset folders, everything else). A dataset file
    or folder is one that prepare writes, by name and type, and not a link; a file inside a folder that is not
    a dataset folder is not a dataset file, whatever its name."""
    if isinstance(fs, LocalFileSystem) and not fs.exists(root):
        return [], [], []
    base = root.rstrip("/") + "/"  # find() raises for a missing bucket, which some servers would create on a write
    entries = {path[len(base):]: info for path, info in fs.find(root, withdirs=True, detail=True).items()
               if path.startswith(base)}
    dirs = sorted(n for n, info in entries.items()
                  if info["type"] == "directory" and not info.get("islink") and DATASET_DIR.fullmatch(n))
    files = sorted(n for n, info in entries.items()
                   if info["type"] == "file" and not info.get("islink") and DATASET_FILE.fullmatch(n)
                   and ("/" not in n or n.split("/")[0] in dirs))
    foreign = sorted(set(entries) - set(files) - set(dirs))
    return files, dirs, foreign


# Sources: the main process lists candidates and reads their bytes; encoder processes decode them.


class _Source(abc.ABC):
    kind = ""  # how an encoder process turns a payload into an image: file, idx, cifar, builtin
    names_are = ""  # what a candidate's name, the `source` of its samples, says

    def __init__(self, path: str, names: list[str]):
        self.path, self.names = path, names

    @abc.abstractmethod
    def payload(self, index: int) -> bytes | int: ...

    def describe(self) -> dict:
        return {"kind": type(self).__name__.strip("_").lower(), "path": self.path, "candidates": len(self.names),
                "sample_source": self.names_are}


class _Unusable(Exception):
    """A candidate refused before it is read (too large, not a regular file): skipped with this reason."""


def _read_bounded(f: BinaryIO, declared: int, name: str) -> bytes:
    """At most MAX_SOURCE_BYTES of f, whatever size its container declares."""
    if declared > MAX_SOURCE_BYTES:
        raise _Unusable(f"{name} is {declared} bytes, more than the {MAX_SOURCE_BYTES} a source image may take")
    data = f.read(MAX_SOURCE_BYTES + 1)
    if len(data) > MAX_SOURCE_BYTES:
        raise _Unusable(f"{name} is more than the {MAX_SOURCE_BYTES} bytes a source image may take")
    return data


class _Folder(_Source):
    kind = "file"
    names_are = "path relative to the folder"

    def __init__(self, root: Path, limit: int | None):
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        super().__init__(str(root.resolve()), files[:limit])
        self.root = root

    def payload(self, index: int) -> bytes:
        with open(self.root / self.names[index], "rb") as f:
            return _read_bounded(f, os.fstat(f.fileno()).st_size, self.names[index])


def _archive_member(name: str) -> bool:
    """An image by its name, not hidden, and with a name short enough for the sample metadata's bound."""
    parts = name.split("/")
    return name.lower().endswith(IMAGE_SUFFIXES) and parts[0] != "__MACOSX" and not any(
        p.startswith(".") for p in parts) and len(name) <= MAX_NAME_CHARS


class _Zip(_Source):
    kind = "file"
    names_are = "member of the zip"

    def __init__(self, path: Path, limit: int | None):
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise DatasetError(f"{path}: not a readable zip ({first_line(e)})") from None
        members = sorted((i for i in self.zip.infolist() if not i.is_dir() and _archive_member(i.filename)),
                         key=lambda i: i.filename)[:limit]
        super().__init__(str(path.resolve()), [i.filename for i in members])
        self.members = members

    def payload(self, index: int) -> bytes:
        member = self.members[index]
        with self.zip.open(member) as f:  # which stops decompressing at the declared size
            return _read_bounded(f, member.file_size, member.filename)


class _Tar(_Source):
    kind = "file"
    names_are = "member of the tar"

    def __init__(self, path: Path, limit: int | None):
        try:
            self.tar = tarfile.open(path, "r:")
            members = sorted((m for m in self.tar.getmembers() if m.isfile() and _archive_member(m.name)),
                             key=lambda m: m.name)[:limit]
        except (tarfile.TarError, OSError) as e:
            raise DatasetError(f"{path}: not a readable uncompressed tar ({first_line(e)}); a compressed tar "
                               "cannot be read in shuffled order, so decompress it first") from None
        super().__init__(str(path.resolve()), [m.name for m in members])
        self.members = members

    def payload(self, index: int) -> bytes:
        member = self.members[index]
        if member.type not in REGULAR_FILE or member.issparse():  # a sparse member expands to its stated size
            raise _Unusable(f"{member.name} is not a regular file")
        return _read_bounded(self.tar.extractfile(member), member.size, member.name)


IDX_NAMES = ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte")


class _Arrays(_Source):
    """Image arrays read whole from a few files (MNIST idx, CIFAR-10 batches), up to the limit."""

    names_are = "file#index: the image's index in that file"

    def __init__(self, files: list[Path], limit: int | None, root: str,
                 read: Callable[[Path, int | None], np.ndarray]):
        arrays, names = [], []
        for file in files:
            want = None if limit is None else limit - len(names)
            if want == 0:
                break
            images = read(file, want)
            arrays.append(images)
            names += [f"{file.name}#{i}" for i in range(len(images))]
        super().__init__(root, names)
        self.images = np.concatenate(arrays)

    def payload(self, index: int) -> bytes:
        return self.images[index].tobytes()


class _Idx(_Arrays):
    """MNIST-family idx3 files (at most 70,000 × 784 bytes)."""

    kind = "idx"

    def __init__(self, files: list[Path], limit: int | None):
        root = str(files[0].parent.resolve()) if len(files) > 1 else str(files[0].resolve())
        super().__init__(files, limit, root, self.read)

    @staticmethod
    def read(file: Path, limit: int | None) -> np.ndarray:
        opener = gzip.open if file.suffix == ".gz" else open
        try:
            capacity = (_uncompressed_size(file) - 16) // 784
            with opener(file, "rb") as f:
                header = f.read(16)
                magic, count, rows, cols = np.frombuffer(header, ">u4") if len(header) == 16 else (0, 0, 0, 0)
                if magic != 0x803 or (rows, cols) != (28, 28):
                    raise DatasetError(f"{file}: not an idx3 file of 28x28 images")
                if count > capacity:
                    raise DatasetError(f"{file}: the idx header claims {count} images, but the file can hold at "
                                       f"most {max(capacity, 0)}")
                want = int(count if limit is None else min(count, limit))
                data = f.read(want * 784)
        except (OSError, EOFError) as e:
            raise DatasetError(f"{file}: cannot read the idx file ({first_line(e)})") from None
        if len(data) < want * 784:
            raise DatasetError(f"{file}: the idx file ends after {len(data) // 784} of the {want} images its "
                               "header promises")
        return np.frombuffer(data, np.uint8).reshape(-1, 28, 28)


def _uncompressed_size(file: Path) -> int:
    """The file's size, or for a .gz the size its trailer records (modulo 2^32, enough for idx files: the
    MNIST family holds at most 70,000 images, 55 MB)."""
    if file.suffix != ".gz":
        return file.stat().st_size
    with open(file, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:
            return 0
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little")


class _ArraysOnly(pickle.Unpickler):
    """A CIFAR-10 batch is a pickle; this one builds uint8 numpy arrays and plain containers, never runs other
    code (nor builds an object array, whose elements could be many references to one big value)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        if (module, name) == ("numpy", "dtype"):
            return _uint8_dtype
        return super().find_class(module, name)


def _uint8_dtype(spec: str, *args) -> np.dtype:
    if spec != "u1":
        raise pickle.UnpicklingError(f"an array of dtype {spec!r} is not allowed in a CIFAR-10 batch (only uint8)")
    return np.dtype(spec, *args)


class _Cifar10(_Arrays):
    """CIFAR-10 python batches (10,000 × 3072 bytes each)."""

    kind = "cifar"

    def __init__(self, files: list[Path], limit: int | None):
        super().__init__(files, limit, str(files[0].parent.resolve()), self.read)

    @staticmethod
    def read(file: Path, limit: int | None) -> np.ndarray:
        """The batch's `data`, refused unless it is a uint8 array of shape (N, 3072): nothing is converted, so a
        list of references to one row cannot become a big array, nor a value of 256 an overflow."""
        try:
            if (size := file.stat().st_size) > CIFAR_BATCH_BYTES:
                raise _Unusable(f"{size} bytes, more than a batch takes ({CIFAR_BATCH_BYTES})")
            batch = _ArraysOnly(io.BytesIO(file.read_bytes()), encoding="bytes").load()
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, IndexError,
                _Unusable) as e:
            raise DatasetError(f"{file}: not a CIFAR-10 python batch ({first_line(e)})") from None
        data = batch.get(b"data") if isinstance(batch, dict) else None
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
            found = (f"an array of {data.dtype} of shape {data.shape}" if isinstance(data, np.ndarray)
                     else f"a {type(data).__name__}")
            raise DatasetError(f"{file}: not a CIFAR-10 python batch (its data is {found}, not uint8 of shape "
                               "(N, 3072))")
        return data[:limit]


class _Builtin(_Source):
    kind = "builtin"
    names_are = "builtin#index: the generator's image index, drawn with the dataset's seed"

    def __init__(self, count: int):
        super().__init__("builtin", [f"builtin#{i}" for i in range(count)])

    def payload(self, index: int) -> int:
        return index


def open_source(source: str, limit: int | None) -> _Source:
    """The source named on the command line, with its candidates listed; DatasetError if there are none."""
    kinds = "an image folder, .zip, .tar, MNIST idx folder, CIFAR-10 folder or 'builtin'"
    if source == "builtin":
        return _Builtin(limit or BUILTIN_COUNT)
    path = Path(source)
    if not path.exists():
        raise DatasetError(f"{source}: no such file or folder (expected {kinds})")
    name = path.name.lower()
    if path.is_dir():
        idx = _idx_files(path)
        cifar_dir = next((d for d in (path, path / "cifar-10-batches-py") if any(d.glob("data_batch_*"))), None)
        if idx:
            src: _Source = _Idx(idx, limit)
        elif cifar_dir is not None:
            src = _Cifar10(sorted(cifar_dir.glob("data_batch_*"), key=lambda p: _natural(p.name)), limit)
        else:
            src = _Folder(path, limit)
    elif name.endswith(".zip"):
        src = _Zip(path, limit)
    elif name.endswith(".tar"):
        src = _Tar(path, limit)
    elif re.fullmatch(r".*-idx3-ubyte(\.gz)?", name):
        src = _Idx([path], limit)
    elif name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        raise DatasetError(f"{source}: a compressed tar cannot be read in shuffled order; decompress it first")
    else:
        raise DatasetError(f"{source}: unknown source kind (expected {kinds})")
    if not src.names:
        raise DatasetError(f"{source}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return src


def _idx_files(folder: Path) -> list[Path]:
    """train before t10k; the uncompressed file when both it and its .gz are there."""
    found: list[Path] = []
    for stem in IDX_NAMES:
        found += [f for f in (folder / stem, folder / f"{stem}.gz") if f.is_file()][:1]
    return found


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# Encoding, in the encoder processes.


def _encode_chunk(kind: str, payloads: Sequence[bytes | int | Exception], *, resolution: int, channels: int,
                  seed: int) -> list[list[bytes] | str]:
    """For each payload, its PNGs at 4 … resolution, or the reason it is skipped. A payload the main process
    could not read arrives as the exception it raised."""
    results: list[list[bytes] | str] = []
    for payload in payloads:
        if isinstance(payload, Exception):
            unread = isinstance(payload, _Unusable)
            results.append(first_line(payload) if unread else f"cannot read: {first_line(payload)}")
            continue
        try:
            image = _load(kind, payload, resolution, channels, seed)
        except UnidentifiedImageError:
            results.append("not an image file that Pillow recognises")
            continue
        except Exception as e:  # whatever a decoder raises on bad bytes means "skip this one", never a bug here
            results.append(f"{type(e).__name__}: {first_line(e)}")
            continue
        levels = [image]
        while levels[-1].shape[0] > 4:
            levels.append(box_downsample(levels[-1]))
        results.append([_png(a) for a in reversed(levels)])
    return results


def box_downsample(a: np.ndarray) -> np.ndarray:
    """2×2 box average of an HxW[xC] uint8 image, rounded half to even."""
    h, w = a.shape[:2]
    return np.rint(a.reshape(h // 2, 2, w // 2, 2, *a.shape[2:]).mean(axis=(1, 3))).astype(np.uint8)


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


def _load(kind: str, payload: bytes | int, resolution: int, channels: int, seed: int) -> np.ndarray:
    if kind == "file":
        image = Image.open(io.BytesIO(payload))
        if image.width * image.height > MAX_SOURCE_PIXELS:
            raise ValueError(f"{image.width}x{image.height} pixels, more than the {MAX_SOURCE_PIXELS} a source "
                             "image may have")
        if image.format == "JPEG":
            image.draft(None, (resolution, resolution))  # decode at a DCT scale that stays ≥ N: much faster
        image = _flatten(ImageOps.exif_transpose(image))
    elif kind == "idx":
        image = Image.fromarray(np.pad(np.frombuffer(payload, np.uint8).reshape(28, 28), 2))
    elif kind == "cifar":
        image = Image.fromarray(np.frombuffer(payload, np.uint8).reshape(3, 32, 32).transpose(1, 2, 0))
    else:
        image = builtin_image(seed, payload, resolution)
    image = _square(image, resolution).convert("L" if channels == 1 else "RGB")
    return np.asarray(image)


def _flatten(image: Image.Image) -> Image.Image:
    """8-bit L or RGB: deep greyscale scaled down, transparency composited over white, CMYK/palette converted."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(image, np.float64)
        image = Image.fromarray(np.clip(a / 257 if image.mode != "F" else a, 0, 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode in ("L", "RGB") else image.convert("RGB")


def _square(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), LANCZOS)


def builtin_image(seed: int, index: int, size: int) -> Image.Image:
    """One flat-coloured shape (disc, triangle, square) on a two-colour linear gradient, drawn at up to 4× and
    Lanczos-reduced so edges are anti-aliased. One large shape a picture keeps the set simple enough that the
    quickstart's few minutes of CPU training show shapes with edges, not blobs."""
    rng = np.random.default_rng([seed % 2**63, index])
    scale = max(1, min(4, 256 // size))
    s = size * scale

    def colour(sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
        return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val))) * 255

    c0, c1 = colour((0.2, 0.6), (0.15, 0.5)), colour((0.2, 0.6), (0.3, 0.7))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:s, 0:s] / (s - 1) - 0.5
    t = np.clip((xx * math.cos(angle) + yy * math.sin(angle)) / (abs(math.cos(angle)) + abs(math.sin(angle))) + 0.5,
                0, 1)
    image = Image.fromarray((c0 + t[..., None] * (c1 - c0)).round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    fill = tuple(int(v) for v in colour((0.6, 1.0), (0.75, 1.0)))
    cx, cy = rng.uniform(0.4, 0.6, 2) * s
    r, turn, sides = rng.uniform(0.24, 0.36) * s, rng.uniform(0, 2 * math.pi), int(rng.integers(2, 5))
    if sides == 2:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx + r * math.cos(turn + 2 * math.pi * k / sides),
                       cy + r * math.sin(turn + 2 * math.pi * k / sides)) for k in range(sides)], fill=fill)
    return image.resize((size, size), LANCZOS) if scale > 1 else image


# Orchestration, in the main process.


def _chunks(src: _Source, order: np.ndarray, resolution: int
            ) -> Iterator[tuple[list[str], list[bytes | int | Exception]]]:
    items = max(1, min(64, CHUNK_PIXELS // resolution**2))
    names: list[str] = []
    payloads: list[bytes | int | Exception] = []
    size = 0
    for index in order:
        try:
            payload = src.payload(int(index))
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error, tarfile.TarError, _Unusable) as e:
            payload = e
        names.append(src.names[index])
        payloads.append(payload)
        size += len(payload) if isinstance(payload, bytes) else 0
        if len(names) == items or size >= CHUNK_BYTES:
            yield names, payloads
            names, payloads, size = [], [], 0
    if names:
        yield names, payloads


def _encoded(src: _Source, order: np.ndarray, resolution: int, encode: Callable, workers: int
             ) -> Iterator[tuple[str, list[bytes] | str]]:
    """(name, PNGs or skip reason) in `order`, with at most 2 chunks per process in flight."""
    if workers <= 1:
        for names, payloads in _chunks(src, order, resolution):
            yield from zip(names, encode(payloads))
        return
    # spawn: a forked child would share the epoll set of the main process's s3fs event loop (see data.py).
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))
    try:
        pending: deque = deque()
        for names, payloads in _chunks(src, order, resolution):
            pending.append((names, pool.submit(encode, payloads)))
            if len(pending) >= 2 * workers:
                names, future = pending.popleft()
                yield from zip(names, future.result())
        for names, future in pending:
            yield from zip(names, future.result())
    finally:
        pool.shutdown(cancel_futures=True)  # after Ctrl-C (the main process's alone), finish running chunks only


class _ShardWriter:
    """One tar shard streamed to storage, hashed and sized on the way. Headers are written here rather than by
    tarfile's stream writer, whose finalizer would write to a closed file after an interrupt; entries carry no
    owner or time, so the same images and seed give the same bytes wherever they are written."""

    def __init__(self, fs, root: str, res: int, index: int):
        self.name = shard_name(res, index)
        self.file = fs.open(join(root, self.name), "wb", block_size=WRITE_BLOCK)
        self.sha256, self.size, self.count = hashlib.sha256(), 0, 0

    def _write(self, data: bytes) -> None:
        self.sha256.update(data)
        self.size += len(data)
        self.file.write(data)

    def add(self, key: str, png: bytes, metadata: bytes) -> None:
        for name, data in ((f"{key}.json", metadata), (f"{key}.png", png)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o444
            self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
            self._write(data + bytes(-len(data) % tarfile.BLOCKSIZE))
        self.count += 1

    def close(self) -> ShardInfo:
        self._write(bytes(2 * tarfile.BLOCKSIZE))  # end of archive
        self.file.close()
        return ShardInfo(self.name, self.count, self.size, self.sha256.hexdigest())


class _DatasetWriter:
    """Samples in order, sample i as key %08d in shard i // shard_size of every resolution: its PNG and, before
    it, a JSON of its provenance (`{"source": name}`, the candidate's name in the source)."""

    def __init__(self, fs, root: str, resolutions: list[int], shard_size: int):
        self.fs, self.root, self.resolutions, self.shard_size = fs, root, resolutions, shard_size
        self.count = 0
        self.open: list[_ShardWriter] = []
        self.done: dict[int, list[ShardInfo]] = {res: [] for res in resolutions}

    def add(self, pngs: list[bytes], source: str) -> None:
        if self.count == 0 and isinstance(self.fs, LocalFileSystem):
            for res in self.resolutions:
                self.fs.makedirs(join(self.root, resolution_dir(res)), exist_ok=True)
        if self.count % self.shard_size == 0:
            self._close_open()
            self.open = [_ShardWriter(self.fs, self.root, res, self.count // self.shard_size)
                         for res in self.resolutions]
        key = sample_key(self.count)
        metadata = json.dumps({"source": source}).encode()
        for shard, png in zip(self.open, pngs):
            shard.add(key, png, metadata)
        self.count += 1

    def _close_open(self) -> None:
        for res, shard in zip(self.resolutions, self.open):
            self.done[res].append(shard.close())
        self.open = []

    def close(self) -> dict[int, list[ShardInfo]]:
        self._close_open()
        return self.done


@contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr if it is a terminal (a log gets only the outcome), or nothing; yields the
    function that advances it by one image."""
    from rich.console import Console

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield lambda: None
        return
    from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    columns = (*Progress.get_default_columns()[:-1], MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("prepare", total=total)
        yield partial(bar.advance, task)
