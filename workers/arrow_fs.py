"""The pyarrow filesystem Ray Train stores its checkpoints through, with the store's retries.

Ray Train reads and writes its checkpoints (and its own bookkeeping) through a pyarrow filesystem; handed plain
fsspec, one refused connection during an upload fails the worker group and costs a restart out of max_failures.
Here every call retries transient errors as `workers.storage.with_retries` does; reads are whole-object GETs and
writes whole-object PUTs, so that each can be repeated as a whole.
"""

from __future__ import annotations

import fsspec
from pyarrow import BufferReader, PythonFile
from pyarrow.fs import FSSpecHandler, PyFileSystem

from workers.storage import PutOnClose, with_retries


class RetryingHandler(FSSpecHandler):
    def __init__(self, fs: fsspec.AbstractFileSystem, budget: float) -> None:
        super().__init__(fs)
        self.budget = budget

    def _retry(self, call, what: str):
        return with_retries(call, what, self.budget)

    def get_file_info(self, paths):
        return self._retry(lambda: super(RetryingHandler, self).get_file_info(paths), f"look at {paths[:1]}")

    def get_file_info_selector(self, selector):
        return self._retry(lambda: super(RetryingHandler, self).get_file_info_selector(selector),
                           f"list {selector.base_dir}")

    def create_dir(self, path, recursive):
        self._retry(lambda: super(RetryingHandler, self).create_dir(path, recursive), f"create {path}")

    def delete_dir(self, path):
        self._retry(lambda: super(RetryingHandler, self).delete_dir(path), f"delete {path}")

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._retry(lambda: super(RetryingHandler, self).delete_dir_contents(path, missing_dir_ok), f"delete {path}")

    def delete_file(self, path):
        self._retry(lambda: super(RetryingHandler, self).delete_file(path), f"delete {path}")

    def move(self, src, dest):
        self._retry(lambda: super(RetryingHandler, self).move(src, dest), f"move {src}")

    def copy_file(self, src, dest):
        self._retry(lambda: super(RetryingHandler, self).copy_file(src, dest), f"copy {src}")

    def open_input_stream(self, path):
        return BufferReader(self._retry(lambda: self.fs.cat_file(path), f"read {path}"))

    def open_input_file(self, path):
        return BufferReader(self._retry(lambda: self.fs.cat_file(path), f"read {path}"))

    def open_output_stream(self, path, metadata):
        return PythonFile(PutOnClose(self.fs, path, self.budget), mode="w")


def retrying_arrow_filesystem(fs: fsspec.AbstractFileSystem, budget: float) -> PyFileSystem:
    return PyFileSystem(RetryingHandler(fs, budget))
