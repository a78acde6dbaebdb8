"""The object store's retries against a real SeaweedFS server that this test stops and starts again (not the
session's server): reads and writes wait out a short outage, give up with StorageUnavailable after the budget,
and never retry an answer that will not change (a missing object, refused credentials)."""

from __future__ import annotations

import threading
import time

import pytest
import s3fs

from tests.conftest import running_s3_server
from workers.arrow_fs import retrying_arrow_filesystem
from workers.storage import StorageUnavailable, with_retries


def counted(call):
    calls = []

    def counting():
        calls.append(time.monotonic())
        return call()

    return counting, calls


def restart_after(server, seconds: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), server.start()))
    thread.start()
    return thread


WEIGHTS = b"weights" * 1000


def write_through(arrow, path: str) -> None:
    with arrow.open_output_stream(path) as out:
        out.write(WEIGHTS)


def test_retries_wait_out_an_outage_and_give_up_after_the_budget():
    with running_s3_server() as server:
        fs = server.filesystem()
        bucket = server.new_bucket()
        fs.pipe_file(f"{bucket}/state.json", b"before")

        # One outage well past botocore's own quick retry (under a second, see StorageOptions.fsspec_kwargs): a read
        # with with_retries and, beside it, an upload through the pyarrow filesystem Ray Train writes its checkpoints
        # with (one whole PUT, retried, on close).
        arrow = retrying_arrow_filesystem(fs, 60)
        read, calls = counted(lambda: fs.cat_file(f"{bucket}/state.json"))
        server.stop()
        restart = restart_after(server, 6)
        upload = threading.Thread(target=write_through, args=(arrow, f"{bucket}/train/checkpoint.pt"))
        upload.start()
        assert with_retries(read, "read state.json", 60) == b"before"  # the same object, after the restart
        upload.join()
        restart.join()
        assert len(calls) >= 2  # it failed at least once while the server was down
        with arrow.open_input_stream(f"{bucket}/train/checkpoint.pt") as f:
            assert f.read() == WEIGHTS

        server.stop()
        write, calls = counted(lambda: fs.pipe_file(f"{bucket}/state.json", b"after"))
        with pytest.raises(StorageUnavailable, match=r"write state.json: the object store did not answer within "
                                                     r"the retry budget of 2 s"):
            with_retries(write, "write state.json", 2)
        server.start()
        assert fs.cat_file(f"{bucket}/state.json") == b"before"  # nothing half-written

        missing, calls = counted(lambda: fs.cat_file(f"{bucket}/no-such-object"))
        with pytest.raises(FileNotFoundError):
            with_retries(missing, "read", 60)
        assert len(calls) == 1
        wrong = s3fs.S3FileSystem(key=server.key, secret="not-the-secret", endpoint_url=server.endpoint)
        forbidden, calls = counted(lambda: wrong.cat_file(f"{bucket}/state.json"))
        with pytest.raises(PermissionError):
            with_retries(forbidden, "read", 60)
        assert len(calls) == 1
