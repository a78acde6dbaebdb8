"""What `progan train` shows: a live display on a terminal, plain progress lines elsewhere, and a summary at the end.

The coordinator reports what happens through `RunConsole`'s events (started, phase started, progress, committed,
note, warning, finished) and never formats anything itself. `LiveConsole` redraws one rich Live display on a
terminal; `PlainConsole` prints a progress line every few seconds and one line per event, without escape codes,
for `ray job logs` and `kubectl logs`. Both print the same summary table and artifact paths at the end.
"""

from __future__ import annotations

import abc
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from service.schedule import Phase, PhaseRecord, RunState, Status

PLAIN_PROGRESS_SECONDS = 10.0
REPEAT_SECONDS = 60.0  # the same warning again only after this long
LIVE_REFRESH_PER_SECOND = 4


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@dataclass
class Figures:
    """The current phase's figures as the run actor last reported them; losses are None until the first report."""

    phase: Phase
    count: int
    images: int = 0
    alpha: float = 0.0
    rate: float = 0.0
    loss_d: float | None = None
    loss_g: float | None = None
    workers: int = 0
    restarts: int = 0
    run_images_before: int = 0
    run_images_target: int = 0
    started: float = field(default_factory=time.time)

    @property
    def phase_eta(self) -> float:
        return (self.phase.images - self.images) / self.rate if self.rate else math.nan

    @property
    def run_eta(self) -> float:
        return (self.run_images_target - self.run_images_before - self.images) / self.rate if self.rate else math.nan

    @property
    def reported(self) -> bool:
        return self.loss_d is not None


class RunConsole(abc.ABC):
    """The events the coordinator sends, and the bookkeeping both kinds of console share. Called from the
    coordinator's threads and Ray's log thread, hence the lock."""

    def __init__(self, out: TextIO | None = None, verbose: bool = False) -> None:
        self.out = out or sys.stdout
        self.verbose = verbose
        self.lock = threading.RLock()
        self.run_url = ""
        self.phases: list[Phase] = []
        self.figures: Figures | None = None
        self.starts_seen: dict[int, int] = {}
        self.restarts_seen: dict[int, int] = {}
        self.swd: dict[int, float] = {}
        self.warned: dict[str, float] = {}

    # Lifetime ---------------------------------------------------------------------------------------------------

    def __enter__(self) -> RunConsole:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop redrawing (the terminal is left as a plain terminal)."""

    # Events -------------------------------------------------------------------------------------------------------

    def started(self, run_url: str, phases: list[Phase], metrics_url: str, logs: str) -> None:
        with self.lock:
            self.run_url, self.phases = run_url, phases
            self.line(f"metrics: {metrics_url}")
            self.line(f"Ray logs: {logs}" + ("" if self.verbose else " (--verbose shows them here)"))

    def phase_started(self, phase: Phase) -> None:
        with self.lock:
            self.figures = Figures(phase, len(self.phases), workers=phase.max_workers,
                                   run_images_target=sum(p.images for p in self.phases),
                                   run_images_before=sum(p.images for p in self.phases[: phase.index]))
            self.line(f"phase {phase.name}: {phase.resolution}² {phase.kind}, {phase.images / 1000:g} kimg, "
                      f"batch {phase.batch} on {phase.workers_text} worker(s)")
            self.refresh()

    def progress(self, progress: dict) -> None:
        """The run actor's `progress()`: rank 0's latest figures, the group's rate, worker-group starts."""
        with self.lock:
            f = self.figures
            if f is None or progress["phase"].get("index") != f.phase.index:
                return
            rank0 = progress["rank0"]
            f.images, f.alpha = rank0.get("phase_images", 0), rank0.get("alpha", 0.0)
            f.rate = progress["images_per_second"]
            f.loss_d, f.loss_g = rank0.get("loss_d"), rank0.get("loss_g")
            f.workers = rank0.get("world_size", f.workers)
            starts = progress["starts"]
            for images in starts[self.starts_seen.get(f.phase.index, 0):]:
                self.line(f"phase {f.phase.name}: {f.workers} worker(s) start at {images}/{f.phase.images} images")
            self.starts_seen[f.phase.index] = len(starts)
            if progress["restarts"] > self.restarts_seen.get(f.phase.index, 0):
                reason = progress.get("restart_reason")
                self.warning(f"phase {f.phase.name}: Ray Train restarted the worker group ({progress['restarts']} "
                             "restart(s) in this phase); it resumes from the latest checkpoint"
                             + (f" ({reason})" if reason else ""))
                self.restarts_seen[f.phase.index] = progress["restarts"]
            f.restarts = progress["restarts"]
            self.refresh()

    def committed(self, phase: Phase, record: PhaseRecord, urls: list[str], swd: float | None) -> None:
        with self.lock:
            self.figures = None  # no progress of a committed phase after its summary line
            if swd is not None:
                self.swd[phase.index] = swd
            self.line(f"committed {' and '.join(urls)}")
            self.line(f"phase {phase.name} done: {record.images} images in {record.seconds:.1f} s, "
                      f"{record.images_per_second:.0f} img/s" + (f", SWD {swd:.2f}" if swd is not None else ""))

    def evaluated(self, phase: Phase, swd: float, url: str) -> None:
        """A phase's evaluation came in (it runs beside the next phase, so after its `committed`)."""
        with self.lock:
            self.swd[phase.index] = swd
            self.line(f"phase {phase.name}: SWD {swd:.2f} ({url})")

    def note(self, text: str) -> None:
        with self.lock:
            self.line(text)

    def warning(self, text: str) -> None:
        now = time.monotonic()
        with self.lock:
            if now - self.warned.get(text, -REPEAT_SECONDS) < REPEAT_SECONDS:
                return
            self.warned[text] = now
            self.line(f"warning: {text}", style="yellow")

    def ray_line(self, text: str) -> None:
        """One of Ray's own log lines; shown with --verbose only (it is in the log file either way)."""
        if self.verbose:
            with self.lock:
                self.line(text, style="dim")

    def finished(self, state: RunState, artifacts: list[str]) -> None:
        with self.lock:
            self.close()
            self.figures = None
            console = self.plain_console()
            console.print(summary_table(self.run_url, state, self.phases, self.swd))
            for url in artifacts:
                console.print(Text(f"wrote {url}"), soft_wrap=True)

    # Rendering ----------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def line(self, text: str, style: str | None = None) -> None: ...

    def refresh(self) -> None:
        """Redraw after new figures (a live display) or print a line when one is due (plain lines)."""

    @abc.abstractmethod
    def plain_console(self) -> Console: ...


def summary_table(run_url: str, state: RunState, phases: list[Phase], swd: dict[int, float]) -> Table:
    table = Table(title=Text(f"{run_url}: {state.status.value}" + (f" ({state.reason})" if state.reason else "")))
    for col, justify in (("phase", "left"), ("res", "right"), ("kind", "left"), ("images", "right"),
                         ("wall", "right"), ("img/s", "right"), ("SWD x1e3", "right")):
        table.add_column(col, justify=justify)
    for record in state.committed:
        phase = phases[record.index]
        table.add_row(phase.name, f"{phase.resolution}²", phase.kind, str(record.images), f"{record.seconds:.1f} s",
                      f"{record.images_per_second:.0f}", f"{swd[record.index]:.2f}" if record.index in swd else "-")
    if state.status is not Status.FINISHED and state.phase < len(phases) and len(state.committed) < len(phases):
        phase = phases[state.phase]
        table.add_row(phase.name, f"{phase.resolution}²", phase.kind, "not committed", "", "", "")
    return table


class PlainConsole(RunConsole):
    """One line per event and a progress line every `every` seconds, and at once when a phase starts and when its
    first figures come in (a short phase could otherwise pass between two lines): no colours, no cursor movement."""

    def __init__(self, out: TextIO | None = None, verbose: bool = False,
                 every: float = PLAIN_PROGRESS_SECONDS) -> None:
        super().__init__(out, verbose)
        self.every = every
        self.last_line = 0.0
        self.last_shown: tuple[int, bool] | None = None  # (phase index, figures reported) of the last progress line

    def line(self, text: str, style: str | None = None) -> None:
        print(text, file=self.out, flush=True)

    def refresh(self) -> None:
        f, now = self.figures, time.monotonic()
        if f is None:
            return
        shown = (f.phase.index, f.reported)
        if shown == self.last_shown and now - self.last_line < self.every:
            return
        self.last_line, self.last_shown = now, shown
        self.line(progress_line(f))

    def plain_console(self) -> Console:
        return Console(file=self.out, force_terminal=False, no_color=True, width=120)


def progress_line(f: Figures) -> str:
    head = f"[{f.phase.index + 1}/{f.count} {f.phase.name}]"
    if not f.reported:
        return f"{head} {f.workers} worker(s) starting ({time.time() - f.started:.0f} s)"
    alpha = f"alpha {f.alpha:.3f}  " if f.phase.fading else ""
    return (f"{head} {alpha}{f.images / 1000:g}/{f.phase.images / 1000:g} kimg  {f.rate:.0f} img/s  "
            f"D {f.loss_d:.3f}  G {f.loss_g:.3f}  ETA {format_eta(f.phase_eta)} (run {format_eta(f.run_eta)})  "
            f"workers {f.workers}  restarts {f.restarts}")


class LiveConsole(RunConsole):
    """A rich Live display of the current phase, with event lines printed above it."""

    def __init__(self, out: TextIO | None = None, verbose: bool = False) -> None:
        super().__init__(out, verbose)
        self.console = Console(file=self.out, highlight=False)
        self.live = Live(console=self.console, refresh_per_second=LIVE_REFRESH_PER_SECOND, transient=True,
                         get_renderable=self.render, redirect_stdout=False, redirect_stderr=False)
        self.live.start()

    def close(self) -> None:
        with self.lock:
            if self.live.is_started:
                self.live.stop()

    def line(self, text: str, style: str | None = None) -> None:
        self.console.print(Text(text, style=style or ""), soft_wrap=True)

    def plain_console(self) -> Console:
        return self.console

    def render(self):
        with self.lock:
            f = self.figures
            if f is None:
                return Text("")
            p = f.phase
            head = Text.assemble((self.run_url, "bold"), f"  phase {p.index + 1}/{f.count} ", (p.name, "cyan"),
                                 f"  {p.resolution}² {p.kind}  workers {f.workers}  restarts {f.restarts}")
            rows = Table.grid(padding=(0, 1))
            rows.add_column(justify="right", style="dim")
            rows.add_column()
            rows.add_column()
            if p.fading:
                rows.add_row("alpha", ProgressBar(total=1.0, completed=f.alpha, width=40), f"{f.alpha:.3f}")
            rows.add_row("kimg", ProgressBar(total=p.images, completed=f.images, width=40),
                         f"{f.images / 1000:.2f}/{p.images / 1000:g}")
            if f.reported:
                figures = (f"{f.rate:.0f} img/s   D {f.loss_d:.3f}   G {f.loss_g:.3f}   "
                           f"ETA phase {format_eta(f.phase_eta)}   run {format_eta(f.run_eta)}")
            else:
                figures = f"{f.workers} worker(s) starting ({time.time() - f.started:.0f} s)"
            return Group(head, rows, Text(figures))
