"""Object storage by URL: a local path, file://, or s3:// (any S3-compatible server), through fsspec.

Both planes use it; credentials come from the environment (AWS_ACCESS_KEY_ID, …) as boto does it.
"""

from __future__ import annotations

import os

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from service.spec import StorageOptions


def filesystem(url: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a URL."""
    kwargs = (options or StorageOptions()).fsspec_kwargs(url)
    return url_to_fs(url, **kwargs)


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace path with data so that a reader sees the old or the new content, never a part.

    S3 PUTs are atomic already; on a local disk write a sibling and rename it over the target.
    """
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp"
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)
