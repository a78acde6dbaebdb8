"""Object storage by URL: a local path, file://, or s3:// (any S3-compatible server), through fsspec.

Both planes use it; credentials come from the environment (AWS_ACCESS_KEY_ID, …) as boto does it.
"""

from __future__ import annotations

import errno
import io
import os
import time
import uuid
from typing import Callable, TypeVar

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


class StorageUnavailable(OSError):
    """The object store kept failing with transient errors for the whole retry budget."""


RETRY_FIRST_SECONDS = 0.5  # the first wait after a transient error; each further wait doubles
RETRY_MAX_SECONDS = 8.0  # the longest single wait, so that a store that is back is noticed within seconds
TRANSIENT_ERRNOS = {errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ECONNRESET,
                    errno.ECONNABORTED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE}
T = TypeVar("T")


def is_transient(e: BaseException) -> bool:
    """Whether an error says the store is down or overloaded (connection refused or reset, a timeout, a 5xx), as
    opposed to an answer that will not change on a retry (4xx: missing, forbidden, bad request)."""
    import asyncio

    import aiohttp
    import botocore.exceptions

    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in chain:
        if isinstance(err, (StorageUnavailable, FileNotFoundError, PermissionError, IsADirectoryError,
                            NotADirectoryError, FileExistsError)):
            return False
        if isinstance(err, botocore.exceptions.ClientError):
            return err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    return any(
        isinstance(err, (ConnectionError, TimeoutError, asyncio.TimeoutError, aiohttp.ClientConnectionError,
                         aiohttp.ClientPayloadError, botocore.exceptions.ConnectionError,
                         botocore.exceptions.HTTPClientError))
        or (isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS)
        for err in chain
    )


def with_retries(call: Callable[[], T], what: str, budget: float) -> T:
    """call(), tried again with exponential backoff (0.5 s, 1 s, 2 s, … at most 8 s) while it fails with a
    transient storage error and `budget` seconds have not passed since the first try; then StorageUnavailable
    naming `what`. Any other error is raised at once. `call` must be safe to repeat (a whole PUT, a whole read).
    A budget of 0 calls once, as commands at the boundary do: a store that does not answer there is a wrong
    address until proven otherwise, and is said at once."""
    if budget <= 0:
        return call()
    deadline = time.monotonic() + budget
    delay = RETRY_FIRST_SECONDS
    while True:
        try:
            return call()
        except storage_errors() as e:
            left = deadline - time.monotonic()
            if not is_transient(e):
                raise
            if left <= 0:
                raise StorageUnavailable(
                    f"{what}: the object store did not answer within the retry budget of {budget:g} s "
                    f"(storage_options.retry_seconds): {type(e).__name__}: {first_line(e)}") from e
            time.sleep(min(delay, left))
            delay = min(2 * delay, RETRY_MAX_SECONDS)


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


class PutOnClose(io.BytesIO):
    """A write stream that sends its bytes as one PUT (retried) when closed, so that an outage during an upload
    costs a retry of that PUT instead of a half-written object."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, budget: float) -> None:
        super().__init__()
        self.fs, self.path, self.budget = fs, path, budget

    def close(self) -> None:
        if self.closed:
            return
        data = self.getvalue()
        try:
            with_retries(lambda: self.fs.pipe_file(self.path, data), f"write {self.path}", self.budget)
        finally:
            super().close()

