"""The checkpoint writer: what it reports is the state at `save`, in order, one at a time, failures surfaced.

`report` is the writer's one seam: the real one is `ray.train.report` (the Ray e2e tests in test_coordinator
run it, with worker restarts); here a recorder reads the checkpoint folder while the report is in progress.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
import torch

from service.spec import parse_spec
from workers.checkpoint import fresh_state, load_payload
from workers.checkpoint_writer import CHECKPOINT_FILE, CheckpointWriter
from workers.step import train_step
from workers.losses import make_loss

SPEC = parse_spec("run: r\ndataset: d\nstorage: s\nresolution: 8\nlatent_size: 16\nfmap_base: 32\nfmap_max: 16\n")


class Recorder:
    """Reads what each report hands over; `gate` holds a report until the test lets it go."""

    def __init__(self) -> None:
        self.reports: list[tuple[dict, dict | None]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, metrics: dict, checkpoint=None) -> None:
        self.entered.set()
        self.gate.wait()
        payload = load_payload(Path(checkpoint.path, CHECKPOINT_FILE).read_bytes()) if checkpoint else None
        self.reports.append((metrics, payload))


def trained_state():
    torch.manual_seed(0)
    state = fresh_state(SPEC, 1, 8, 0.001, torch.device("cpu"))
    step(state)  # Adam's moments exist once a step has run
    return state


def step(state) -> None:
    train_step(state, make_loss("wgan-gp"), torch.rand(4, 3, 8, 8) * 2 - 1, 0.5, True, SPEC, 1)


def same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b


def test_a_checkpoint_is_the_state_at_save_even_while_training_goes_on():
    state, recorder = trained_state(), Recorder()
    writer = CheckpointWriter(0, 0, report=recorder)
    state.phase_images = 4
    expected = copy.deepcopy(state.payload())
    recorder.gate.clear()
    writer.save(state, {"phase_images": 4, "done": False})
    recorder.entered.wait()
    step(state)  # training changes the weights and Adam's moments in place while the report is in progress
    state.phase_images = 8
    assert writer.persisted_images == 0  # a kill now resumes from the checkpoint before: the loop's redo bound
    recorder.gate.set()
    writer.close()
    assert writer.persisted_images == 4
    (metrics, payload), = recorder.reports
    assert metrics == {"phase_images": 4, "done": False}
    assert same_tensors({k: v for k, v in expected.items() if k != "rng"}, {k: v for k, v in payload.items() if k != "rng"})
    assert not same_tensors(state.payload()["G"], payload["G"])  # the step did change the live state


def test_one_checkpoint_in_flight_in_order_and_the_snapshot_reused():
    state, recorder = trained_state(), Recorder()
    writer = CheckpointWriter(0, 0, report=recorder)
    recorder.gate.clear()
    writer.save(state, {"phase_images": 4})
    first = writer._snapshot["D"]
    second = threading.Thread(target=writer.save, args=(state, {"phase_images": 8}))
    second.start()
    second.join(0.5)
    assert second.is_alive() and recorder.reports == []  # the second save waits for the first report
    recorder.gate.set()
    second.join()
    writer.close()
    assert [m["phase_images"] for m, _ in recorder.reports] == [4, 8]
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(first.values(), writer._snapshot["D"].values()))


def test_other_ranks_report_without_a_checkpoint():
    recorder = Recorder()
    writer = CheckpointWriter(1, 0, report=recorder)
    writer.save(trained_state(), {"phase_images": 4})
    writer.close()
    assert recorder.reports == [({"phase_images": 4}, None)]


def test_a_failed_report_is_raised_on_the_training_thread():
    def failing(metrics, checkpoint=None):
        raise OSError("store unreachable")

    writer = CheckpointWriter(0, 0, report=failing)
    writer.save(trained_state(), {"phase_images": 4})
    with pytest.raises(OSError, match="store unreachable"):
        writer.close()
    writer.close()  # raised once; the writer is idle again
