"""Where Ray's own log lines go during `progan train`: to a log file, not to the terminal.

Ray forwards the stdout and stderr of every worker and actor (Ray Train's controller and workers included) to
the driver, and prints the cluster's error messages (a dead worker, resources that cannot be scheduled) there
too, both through `ray._private.worker.print_to_stdstream`. The driver keeps the forwarding, so that lines from
workers on other nodes are not lost, and `RayLogRouter` takes the place of that function: every line goes to the
log file, the few that matter to the user (a lost worker, a failed or waiting placement, a worker-group failure)
become one warning line each, and `--verbose` shows them all. Ray offers no public hook for this; a Ray upgrade
that moves the function lets its lines through, which tests/test_console.py catches. The driver's own `ray`
loggers are pointed at the same file.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path

from service.console import RunConsole

# Lines from Ray that a user should see, whatever their log level says (the PreemptionWatcher "E" line is noise).
MATTERS = re.compile(
    r"cannot be scheduled|insufficient (cluster )?resources|WorkerGroupStartupTimeout|worker group .*(timed out|failed)"
    r"|died|was killed|node .*(dead|failed|removed)|out of memory|OutOfMemory",
    re.IGNORECASE,
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class RayLogRouter:
    """Ray's forwarded lines and the driver's Ray loggers, written to a file and filtered for the console."""

    def __init__(self, console: RunConsole) -> None:
        self.console = console
        self.lock = threading.Lock()
        self.file = None
        self.path: str | None = None
        self.pending: list[str] = []  # lines that came before the file was chosen
        self.handler = DriverLogHandler(self)

    # Installation -------------------------------------------------------------------------------------------------

    def install(self) -> None:
        """Take over before `ray.init`. `ray.init(configure_logging=False)` empties the `ray` logger's handlers, so
        during the call `ray._private` (where its own warnings come from) holds ours, and `connected` moves it."""
        import ray._private.worker as ray_worker

        ray_worker.print_to_stdstream = self.on_ray_output
        ray_logger = logging.getLogger("ray")
        for handler in list(ray_logger.handlers):
            ray_logger.removeHandler(handler)
        ray_logger.propagate = False
        logging.getLogger("ray._private").addHandler(self.handler)

    def connected(self) -> None:
        """After `ray.init`: the driver's `ray.*` loggers into the file from now on."""
        logging.getLogger("ray._private").removeHandler(self.handler)
        ray_logger = logging.getLogger("ray")
        ray_logger.handlers.clear()
        ray_logger.addHandler(self.handler)
        ray_logger.propagate = False

    def open(self, folder: str | None) -> str:
        """Write to a new file in `folder`, or in Ray's log folder of this session when there is none; returns its
        path."""
        if folder is None:
            folder = ray_log_folder()
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"ray-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
        with self.lock:
            self.file = open(path, "a", buffering=1)
            self.path = path
            for line in self.pending:
                self.file.write(line + "\n")
            self.pending.clear()
        return path

    # Lines ----------------------------------------------------------------------------------------------------------

    def write(self, line: str) -> None:
        with self.lock:
            if self.file is None:
                self.pending.append(line)
            else:
                self.file.write(line + "\n")
        self.console.ray_line(line)

    def on_ray_output(self, data: dict, ignore_prefix: bool = False) -> None:
        """Ray's forwarded batch: {"lines", "pid", "actor_name" or "task_name", "ip", "is_err", …}."""
        source = data.get("pid")
        name = data.get("actor_name") or data.get("task_name") or ""
        named = source in ("raylet", "autoscaler")
        prefix = f"({source})" if named else f"({name + ' ' if name else ''}pid={source}, ip={data.get('ip', '')})"
        lines = [ANSI.sub("", line) for line in data.get("lines", [])]
        for line in lines:
            self.write(f"{prefix} {line}")
        self.surface_from(lines, cluster=source == "raylet")

    def surface_from(self, lines: list[str], cluster: bool) -> None:
        for i, line in enumerate(lines):
            text = line.strip()
            if not text:
                continue
            if "[FailurePolicy]" in text:  # the decision, then its source, count and error on the next lines
                error = next((rest.strip() for rest in lines[i + 1:] if rest.startswith("Error:")), "")
                self.surface(f"Ray Train worker group failed ({text.split(']', 1)[1].strip()}) {error}".strip())
                return
            if cluster or MATTERS.search(text):
                self.surface(f"Ray: {text}")
            if cluster:
                return  # one line per cluster error message (a dead worker, an unschedulable request)

    def surface(self, text: str) -> None:
        self.console.warning(text[:300])


class DriverLogHandler(logging.Handler):
    """The driver's `ray.*` loggers: into the router's file; warnings that matter also to the console."""

    def __init__(self, router: RayLogRouter) -> None:
        super().__init__(logging.INFO)
        self.router = router
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        text = ANSI.sub("", self.format(record))
        for line in text.splitlines():
            self.router.write(f"(driver) {line}")
        if record.levelno >= logging.WARNING and MATTERS.search(record.getMessage()):
            self.router.surface(f"Ray: {record.getMessage().splitlines()[0]}")


def ray_log_folder() -> str:
    """This Ray session's log folder on the driver's node (where the workers' own log files are too)."""
    import ray._private.worker as ray_worker

    node = ray_worker._global_node
    return node.get_logs_dir_path() if node is not None else str(Path(tempfile.gettempdir()) / "progan-logs")
