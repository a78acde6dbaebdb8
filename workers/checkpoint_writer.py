"""Checkpoints off the training thread: copy the state in the loop, serialize and report it on a thread of its own.

Serializing a full-size ProGAN's state (three networks and two Adam states, ~750 MB at 128²) and uploading it
takes seconds; the training thread only pays for a memory copy into a snapshot kept from the previous
checkpoint. A checkpoint writer thread then serializes the snapshot, writes it into a temporary folder and calls
`ray.train.report`, which persists it under the phase's Ray Train storage.

Why this is correct with Ray Train V2 (ray 2.60), read from its source (`ray/train/v2/_internal/execution/
context.py`):
- `ray.train.report` is a collective: every rank must call it, in the same order, for every checkpoint (rank 0
  with the checkpoint, the others with None). It first agrees on the checkpoint folder name through the run's
  synchronization actor (a `ray.get` barrier, not a torch.distributed collective), then uploads, then puts the
  result on the worker's result queue in report order. So every rank reports from its own writer thread, at the
  same step counts: the barrier pairs writer threads with each other and never with the training threads'
  all-reduces, which run on.
- The train context is one process-wide object behind a lock, not thread-local state, so a report from another
  thread than the one Ray Train started is the same report. Nothing else in `train_phase` calls a Ray Train
  collective, so the writer thread is the only caller and the collective order cannot interleave.
- Ray Train's own `checkpoint_upload_mode=ASYNC` only moves the upload: the checkpoint folder must already be
  written when `report` is called, and writing it (serialization) is most of the stall. So reports stay SYNC, on
  our thread.
- One checkpoint in flight at most: `save` first waits for the previous report, so the snapshot it reuses is no
  longer being read, reports stay in step order, and a slow store slows training down instead of piling up
  snapshots. A failed report is raised on the training thread at the next `save` or at `close`, which fails
  the worker like a synchronous failure would.
- A checkpoint counts once `report` has returned: a worker that dies with one in flight restarts from the latest
  reported one. So a kill costs the images since the latest *persisted* checkpoint, which with writes in flight
  would be the interval plus the images trained during one write. `train_phase` keeps the synchronous bound
  (at most one interval lost) by taking checkpoints every half interval and waiting, before a step, for the one
  in flight whenever that step would take it more than an interval past `persisted_images`.
- The phase's final checkpoint goes through the same writer and `close` waits for it before the training
  function returns, so it is still the last one reported and the one `Result.checkpoint` gives the coordinator
  to commit.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ray.train
import torch

from workers.checkpoint import TrainingState, payload_bytes, snapshot

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_DIGEST = "checkpoint.sha256"  # beside each in-phase checkpoint, so that a torn one is told, not half-loaded


class CheckpointWriter:
    """One rank's checkpoints: `save` copies the state and returns; a thread serializes and reports it."""

    def __init__(self, rank: int, persisted_images: int, on_persisted: Callable[[float], None] | None = None,
                 report: Callable[..., None] = ray.train.report) -> None:
        self.rank = rank
        self.persisted_images = persisted_images  # the phase's images in the latest reported checkpoint
        self.on_persisted = on_persisted  # rank 0: seconds from save() to the report's return, for the metrics
        self.report = report
        self._snapshot: dict | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: TrainingState, metrics: dict) -> float:
        """Hand a checkpoint of `state` to the writer thread; returns the seconds the caller was held up (waiting
        for the previous checkpoint included)."""
        start = time.monotonic()
        self.wait()
        if self.rank == 0:
            self._snapshot = snapshot(state.payload(), self._snapshot)
            if next(state.G.parameters()).is_cuda:
                torch.cuda.current_stream().synchronize()  # the non-blocking copies have landed
        self._thread = threading.Thread(target=self._persist,
                                        args=(self._snapshot, dict(metrics), state.phase_images, start),
                                        name="checkpoint-writer", daemon=True)
        self._thread.start()
        return time.monotonic() - start

    def wait(self) -> None:
        """Until the checkpoint in flight is reported; raises its failure, if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    close = wait

    def _persist(self, payload: dict | None, metrics: dict, images: int, started: float) -> None:
        try:
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if payload is not None:
                    data = payload_bytes(payload)
                    Path(d, CHECKPOINT_FILE).write_bytes(data)
                    Path(d, CHECKPOINT_DIGEST).write_text(hashlib.sha256(data).hexdigest())
                    checkpoint = ray.train.Checkpoint.from_directory(d)
                self.report(metrics, checkpoint=checkpoint)
            self.persisted_images = images
            if self.on_persisted is not None:
                self.on_persisted(time.monotonic() - started)
        except BaseException as e:  # noqa: BLE001 - raised on the training thread by wait()
            self._error = e
