"""write_atomic: a reader sees the old or the new content, never a part; local writes reach the disk."""

from __future__ import annotations

import os
import threading

import pytest
from fsspec.implementations.local import LocalFileSystem

from workers.storage import filesystem, write_atomic


def test_local_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    fs, path = filesystem(str(tmp_path / "run" / "state.json"))
    write_atomic(fs, path, b"old")
    write_atomic(fs, path, b"new")
    assert (tmp_path / "run" / "state.json").read_bytes() == b"new"
    assert os.listdir(tmp_path / "run") == ["state.json"]


def test_local_write_fsyncs_the_file_and_the_folder_before_and_after_the_rename(tmp_path, monkeypatch):
    """The file's bytes are on disk before the rename makes them visible, and the rename is on disk after."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "state.json"
    write_atomic(LocalFileSystem(), str(target), b"{}")
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].startswith(str(tmp_path / ".state.json.")) and events[0][1].endswith(".tmp")
    assert events[1][1] == str(target)
    assert events[2][1] == str(tmp_path)  # the folder, so that the rename survives a crash


def test_concurrent_local_writers_never_share_a_temp_file(tmp_path):
    """Each writer has a temp name of its own: the result is one writer's whole content, and no temp is left."""
    fs, path = LocalFileSystem(), str(tmp_path / "state.json")
    contents = [bytes([i]) * 200_000 for i in range(8)]
    errors: list[BaseException] = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(20):
                write_atomic(fs, path, data)
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(c,)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert (tmp_path / "state.json").read_bytes() in contents
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_failed_local_write_keeps_the_old_content_and_removes_its_temp(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    write_atomic(LocalFileSystem(), str(target), b"old")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(LocalFileSystem(), str(target), b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_s3_write_puts_the_object_with_nothing_beside_it(s3_server, s3_bucket):
    fs, path = filesystem(f"s3://{s3_bucket}/run/state.json")
    write_atomic(fs, path, b"old")
    write_atomic(fs, path, b"new" * 1000)
    fs.invalidate_cache()
    assert fs.cat_file(path) == b"new" * 1000
    assert fs.find(f"{s3_bucket}/run") == [f"{s3_bucket}/run/state.json"]  # no temp object beside it
