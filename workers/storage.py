"""Object storage by URL: a local path, file://, or s3:// (any S3-compatible server), through fsspec.

Both planes use it; credentials come from the environment (AWS_ACCESS_KEY_ID, …) as boto does it.
"""

from __future__ import annotations

import os
import uuid

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


def storage_errors() -> tuple[type[BaseException], ...]:
    """What fsspec backends raise for a missing object, a wrong endpoint, bucket or credentials (s3fs lets some
    botocore and aiohttp errors through raw)."""
    import aiohttp
    import botocore.exceptions

    return (OSError, botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, aiohttp.ClientError)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Replace path with data so that a reader sees the old or the new content, never a part, even after a crash.

    S3 PUTs are atomic already: one PUT. On a local disk: a sibling with a unique name (two writers never share
    one), fsync'd, renamed over the target, and the folder fsync'd so that the rename itself is on disk.
    """
    if not isinstance(fs, LocalFileSystem):
        fs.pipe_file(path, data)
        return
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask decides, as for any other file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
