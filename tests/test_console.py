"""What `progan train` prints: on a pseudo-terminal a live display and a summary, through a pipe plain progress
lines; Ray's own log lines in neither, but in the run's logs/ folder. Real training, real local Ray cluster (the
one `progan train` starts without --address), as a user runs it."""

from __future__ import annotations

import fcntl
import io
import os
import re
import struct
import subprocess
import termios
import threading
from pathlib import Path

import pytest

from service.console import PlainConsole
from service.ray_logs import RayLogRouter
from service.schedule import build_schedule
from service.spec import parse_spec
from tests.conftest import PROGAN, run_env, tiny_spec

RAY_LINES = re.compile(r"TrainController|RayTrainWorker|core_worker|\(pid=|Checkpoint successfully created|"
                       r"Reporting training result|PreemptionWatcher|autoscaler")
NAN = re.compile(r"\bnan\b", re.IGNORECASE)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PHASES = ("00-0004-stable", "01-0008-fade", "02-0008-stable")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    data = tmp_path_factory.mktemp("console") / "builtin8"
    subprocess.run([PROGAN, "prepare", "builtin", str(data), "--resolution", "8", "--limit", "128",
                    "--shard-size", "64"], check=True, capture_output=True, env=run_env())
    return str(data)


def console_spec(tmp_path: Path, dataset: str, run: str) -> tuple[Path, Path]:
    """The smallest schedule, 4² → 8² in three phases of 64 images on 2 workers; returns (spec, run folder)."""
    return tiny_spec(tmp_path, dataset, str(tmp_path / "runs"), run, resolution=8, data_workers=0), tmp_path / "runs" / run


def train_env() -> dict[str, str]:
    env = run_env({"COLUMNS": "120", "LINES": "40"})
    env.pop("RAY_ADDRESS", None)
    return env


def run_on_a_terminal(args: list[str], timeout: float) -> tuple[int, str]:
    """Run with stdout and stderr on a pseudo-terminal of 120 x 40; returns (exit status, everything it wrote)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=train_env(), close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other side has closed it
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=30)
    os.close(master)
    return code, b"".join(chunks).decode(errors="replace")


def ray_log_file(run_dir: Path) -> str:
    files = sorted((run_dir / "logs").glob("ray-*.log"))
    assert files, f"no Ray log file under {run_dir / 'logs'}"
    return files[-1].read_text()


def assert_ray_lines_kept_apart(output: str, run_dir: Path) -> None:
    assert not RAY_LINES.search(output), RAY_LINES.search(output).group(0) + "\n" + output[-3000:]
    assert not NAN.search(output), output[-3000:]
    logged = ray_log_file(run_dir)
    for needle in ("TrainController", "RayTrainWorker", "Checkpoint successfully created", "Reporting training result"):
        assert needle in logged, needle
    assert f"Ray logs: {run_dir / 'logs'}" in output


def assert_summary(text: str, run_dir: Path) -> None:
    """The closing table (a row per phase under its header) and the artifact paths."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if "phase" in line and "img/s" in line and "wall" in line)
    rows = lines[header:]
    for name in PHASES:
        assert any(name in row and " 64 " in row for row in rows), "\n".join(rows)
    for artifact in ("growth-timeline.png", "interpolation.png", "interpolation.gif"):
        assert f"wrote {run_dir / 'samples' / artifact}" in text


@pytest.mark.slow
def test_terminal_shows_a_live_display_and_a_summary_but_no_ray_lines(tmp_path, dataset):
    spec, run_dir = console_spec(tmp_path, dataset, "tty")
    code, output = run_on_a_terminal([PROGAN, "train", str(spec)], timeout=600)
    assert code == 0, output[-3000:]
    assert_ray_lines_kept_apart(output, run_dir)
    plain = ANSI.sub("", output).replace("\r", "\n")
    assert "\x1b[2K" in output and "━" in plain  # the live display redraws itself, bars and all
    assert re.search(r"phase 2/3 01-0008-fade\s+8² fade", plain), plain[-3000:]
    assert re.search(r"alpha\s+━", plain), plain[-3000:]  # the fade has its alpha bar
    assert re.search(r"\d+ img/s\s+D -?\d+\.\d{3}\s+G -?\d+\.\d{3}\s+ETA phase", plain), plain[-3000:]
    assert_summary(plain, run_dir)
    assert plain.rstrip().endswith(f"{run_dir}: FINISHED")


@pytest.mark.slow
def test_a_pipe_gets_plain_progress_lines(tmp_path, dataset):
    spec, run_dir = console_spec(tmp_path, dataset, "piped")
    result = subprocess.run([PROGAN, "train", str(spec), "--progress-seconds", "1"], capture_output=True,
                            text=True, env=train_env(), timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "\x1b" not in output
    assert_ray_lines_kept_apart(output, run_dir)
    lines = result.stdout.splitlines()
    progress = [line for line in lines if line.startswith("[")]
    for i, name in enumerate(PHASES):
        assert f"phase {name}: 2 worker(s) start at 0/64 images" in lines
        assert any(line.startswith(f"[{i + 1}/3 {name}] ") for line in progress), progress
    assert any(re.search(r"\d+ img/s  D -?\d+\.\d{3}  G -?\d+\.\d{3}  ETA", line) for line in progress), progress
    assert any("alpha" in line for line in progress if "01-0008-fade" in line)
    assert not any("alpha" in line for line in progress if "stable" in line)
    assert sum(line.startswith("committed ") for line in lines) == 3
    assert_summary(result.stdout, run_dir)


def test_a_pipe_gets_a_line_when_a_phase_starts_and_when_its_first_figures_come_in():
    """However short the phase: with a line due only every hour, the start and the first figures still show."""
    spec = parse_spec("run: r\ndataset: d\nstorage: s\nresolution: 8\n")
    phases = build_schedule(spec)
    out = io.StringIO()
    console = PlainConsole(out, every=3600)
    console.started("runs/r", phases, "http://127.0.0.1:1/metrics", "logs")

    def progress(phase, images: int) -> dict:
        rank0 = {"phase_images": images, "alpha": 0.5, "loss_d": 1.0, "loss_g": -1.0, "world_size": 2} if images else {}
        return {"phase": {"index": phase.index}, "rank0": rank0, "images_per_second": 100.0, "starts": [],
                "restarts": 0}

    for phase in phases[:2]:
        console.phase_started(phase)
        for images in (0, 0, 32, 64):
            console.progress(progress(phase, images))
    progress_lines = [line for line in out.getvalue().splitlines() if line.startswith("[")]
    assert [line.split("] ")[0] + "] " + ("figures" if "img/s" in line else "starting") for line in progress_lines] == [
        f"[1/{len(phases)} {phases[0].name}] starting", f"[1/{len(phases)} {phases[0].name}] figures",
        f"[2/{len(phases)} {phases[1].name}] starting", f"[2/{len(phases)} {phases[1].name}] figures"]
    assert "alpha 0.500" in progress_lines[3]
    assert f" 0.032/{phases[1].images / 1000:g} kimg " in progress_lines[3]  # a short phase's images, not rounded away


def test_ray_lines_go_to_the_file_and_only_what_matters_reaches_the_console(tmp_path):
    """The router on Ray's own batches, as Ray's log thread hands them over: worker output stays in the file,
    a cluster error message becomes one warning line, and --verbose shows everything."""
    out = io.StringIO()
    router = RayLogRouter(PlainConsole(out))
    path = router.open(str(tmp_path / "logs"))
    router.on_ray_output({"lines": ["Reporting training result 1: TrainingReport(...)"], "pid": 41,
                          "actor_name": "RayTrainWorker", "ip": "127.0.0.1", "is_err": False})
    router.on_ray_output({"lines": ["[2026-11-30 09:44:56,135 E 7867 7954] core_worker.cc:2465: Actor with class "
                                    "name: 'PreemptionWatcher' has constructor arguments in the object store"],
                          "pid": 42, "actor_name": "TrainController", "ip": "127.0.0.1", "is_err": True})
    died = ("A worker died or was killed while executing a task by an unexpected system error. To troubleshoot "
            "the problem, check the logs for the dead worker.")
    for _ in range(2):
        router.on_ray_output({"lines": [died, "RayTaskError: ...", "Worker exit type: SYSTEM_ERROR"],
                              "pid": "raylet", "is_err": False})
    router.on_ray_output({"lines": ["[FailurePolicy] RETRY", "  Source: worker group", "  Error count: 1 (max allowed: 1)",
                                    "Error: Worker group 0 failed: the actor died unexpectedly"],
                          "pid": 42, "actor_name": "TrainController", "ip": "127.0.0.1", "is_err": True})
    assert out.getvalue().splitlines() == [
        f"warning: Ray: {died}",
        "warning: Ray Train worker group failed (RETRY) Error: Worker group 0 failed: the actor died unexpectedly",
    ]
    logged = Path(path).read_text()
    assert "(RayTrainWorker pid=41, ip=127.0.0.1) Reporting training result 1" in logged
    assert "PreemptionWatcher" in logged and logged.count(died) == 2

    verbose = io.StringIO()
    router = RayLogRouter(PlainConsole(verbose, verbose=True))
    router.on_ray_output({"lines": ["Requesting resources: {'CPU': 1.0} * 2"], "pid": 7, "actor_name": "TrainController",
                          "ip": "127.0.0.1", "is_err": False})
    assert verbose.getvalue() == "(TrainController pid=7, ip=127.0.0.1) Requesting resources: {'CPU': 1.0} * 2\n"
