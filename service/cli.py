"""`progan`: the command line. Each command validates its input at this boundary and exits 2 with one line
naming the problem; the work itself lives in the modules it calls."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from service.spec import MAX_EVAL_IMAGES, SpecError, StorageOptions, load_spec

MAX_SAMPLES = 1024  # `sample --n`: a 32 x 32 grid
MAX_KEYFRAMES = 64  # `interpolate --keyframes` and `--steps`: at most 4096 frames
MAX_STEPS = 64


class App(typer.Typer):
    """The console script: a usage error (a bad option value, a missing argument) is one line and exit 2, like
    every other bad input, instead of click's framed box."""

    def __call__(self, *args, **kwargs):
        if args or kwargs:
            return super().__call__(*args, **kwargs)
        errors = sys.modules[typer.BadParameter.__module__]  # click's exceptions, or typer's copy of them
        try:
            code = typer.main.get_command(self).main(standalone_mode=False)
        except typer.Abort:
            code = 1
        except getattr(errors, "NoArgsIsHelpError", ()) as e:  # a command (group) called without arguments
            if e.format_message():
                typer.echo(e.format_message())
            code = e.exit_code
        except errors.ClickException as e:
            typer.echo("error: " + " ".join(e.format_message().split()), err=True)
            code = e.exit_code
        sys.exit(code or 0)


app = App(help="Progressive GAN training on Ray.", no_args_is_help=True, add_completion=False)

EndpointOpt = Annotated[Optional[str], typer.Option("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")]
RegionOpt = Annotated[Optional[str], typer.Option("--region", help="S3 region")]


def fail(message: str) -> typer.Exit:
    """Print one line and exit 2 (a message from below that spans lines is joined into one)."""
    typer.echo("error: " + "; ".join(line.strip() for line in message.splitlines() if line.strip()), err=True)
    return typer.Exit(2)


USER_ERRORS = (
    ("service.artifacts", "EvaluationError"),
    ("service.run_open", "CoordinatorError"),
    ("service.runstore", "RunStoreError"),
    ("workers.commit", "CheckpointError"),
    ("workers.data", "DatasetError"),
)


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean "your input is wrong", as opposed to a bug. Only those of modules already imported
    can have been raised, so none is imported here: `status` or `stop` never loads Ray or torch to fail."""
    return (SpecError, *(getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules))


@contextlib.contextmanager
def one_line_errors(subject: str) -> Iterator[None]:
    """Bad input and unusable storage (a refused endpoint, a missing bucket, no permission) end the command with
    one line naming `subject` or the object, and exit 2."""
    from workers.storage import storage_errors

    try:
        yield
    except user_errors() as e:
        raise fail(str(e)) from None
    except storage_errors() as e:
        text = str(e).strip()
        raise fail(f"{subject}: {type(e).__name__}: {text.splitlines()[0] if text else 'storage error'}") from None


@app.command()
def plan(spec: Path, as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Print the phase plan of a job spec."""
    from rich.console import Console
    from rich.table import Table

    from service.schedule import build_schedule

    try:
        s = load_spec(spec)
    except SpecError as e:
        raise fail(str(e)) from None
    phases = build_schedule(s)
    if as_json:
        rows = [dict(vars(p), name=p.name, batch_per_worker=p.batch_per_worker) for p in phases]
        typer.echo(json.dumps({"run": s.run, "phases": rows}, indent=2, allow_nan=False))  # strict JSON
        return
    table = Table(title=f"{s.run}: 4² → {s.resolution}², {len(phases)} phases")
    for col in ("phase", "res", "kind", "kimg", "batch", "per worker", "lr", "workers"):
        table.add_column(col, justify="right")
    for p in phases:
        table.add_row(p.name, str(p.resolution), p.kind, f"{p.images / 1000:g}", str(p.batch),
                      str(p.batch_per_worker), f"{p.lr:g}", p.workers_text)
    Console().print(table)
    total = sum(p.images for p in phases)
    typer.echo(f"total: {total / 1000:g} kimg")


@app.command()
def prepare(
    source: Annotated[str, typer.Argument(help="image folder, .zip/.tar, MNIST idx folder, CIFAR-10 folder, or 'builtin'")],
    dest: Annotated[str, typer.Argument(help="dataset URL: path, file:// or s3://bucket/prefix")],
    resolution: Annotated[int, typer.Option("--resolution", "-r", help="highest resolution, a power of two")],
    channels: Annotated[int, typer.Option(help="1 (grayscale) or 3 (RGB)")] = 3,
    shard_size: Annotated[int, typer.Option(help="samples per tar shard")] = 1000,
    limit: Annotated[Optional[int], typer.Option(help="use at most this many images")] = None,
    seed: Annotated[int, typer.Option(help="seed of the sample order")] = 0,
    workers: Annotated[int, typer.Option(help="encoding processes")] = 2,
    overwrite: Annotated[bool, typer.Option(help="replace a dataset at DEST, or write into a non-empty DEST; only dataset files are removed")] = False,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
) -> None:
    """Write a multi-resolution WebDataset (one shard set per resolution) from images."""
    from workers.data import DatasetError
    from workers.prepare import prepare as run_prepare

    try:
        manifest = run_prepare(
            source, dest, resolution=resolution, channels=channels, shard_size=shard_size, limit=limit, seed=seed,
            workers=workers, overwrite=overwrite, storage_options=StorageOptions(endpoint_url=endpoint_url, region=region),
        )
    except DatasetError as e:  # the one error prepare raises; user_errors() would import Ray and torch first
        raise fail(str(e)) from None
    typer.echo(f"{dest}: {manifest.count} images at {manifest.resolutions}, {len(manifest.skipped)} skipped")


@app.command()
def train(
    spec: Path,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address; default: RAY_ADDRESS or a new local cluster")] = None,
    new_run: Annotated[bool, typer.Option("--new-run", help="delete the stored run of this name and start over "
                                          "(a folder that is not a run is refused)")] = False,
    metrics_port: Annotated[Optional[int], typer.Option(help="override the spec's metrics_port (0: any free port)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="also show Ray's own log lines")] = False,
    progress_seconds: Annotated[float, typer.Option(help="seconds between progress lines when stdout is not a terminal")] = 10.0,
) -> None:
    """Train a job spec to the end; the same spec again resumes it. On a terminal a live display, else a progress
    line every --progress-seconds; Ray's own log lines go to a file named at start."""
    from service.console import LiveConsole, PlainConsole
    from service.run_open import open_run
    from service.schedule import Status

    if progress_seconds <= 0:
        raise fail(f"--progress-seconds must be positive, got {progress_seconds:g}")
    with one_line_errors(str(spec)):
        s = load_spec(spec).with_absolute_paths()
        console = LiveConsole(verbose=verbose) if sys.stdout.isatty() else PlainConsole(verbose=verbose, every=progress_seconds)
        with console:
            run = open_run(s, new_run=new_run, console=console, address=address)
            from service.coordinator import train as run_training  # Ray and torch: only once the run is open

            state = run_training(run, address=address, metrics_port=metrics_port, console=console)
    typer.echo(f"{s.run_url}: {state.status.value}" + (f": {state.reason}" if state.status is Status.FAILED else ""))
    if state.status is Status.STOPPED:
        raise typer.Exit(0)
    if state.status is not Status.FINISHED:
        raise typer.Exit(1)


def open_store(run_url: str, endpoint_url: str | None, region: str | None):
    """The run store at run_url, once its state.json and spec.yaml have been read and agree."""
    from service.runstore import RunStore

    with one_line_errors(run_url):
        # a command run by hand says at once that the store does not answer; only training waits an outage out
        store = RunStore(run_url, StorageOptions(endpoint_url=endpoint_url, region=region, retry_seconds=0))
        if not store.exists():
            raise fail(f"{run_url} is not a run: it has no state.json")
        store.read_state()
    return store


@app.command()
def status(
    run_url: str,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
) -> None:
    """State, phase, resolution, alpha, images, last committed checkpoint and per-phase wall times of a run."""
    from service.run_status import describe

    store = open_store(run_url, endpoint_url, region)
    with one_line_errors(run_url):
        report = describe(store)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        if key != "phases":
            typer.echo(f"{key:>18}: {value}")
    for p in report["phases"]:
        typer.echo(f"{'':>18}  {p['name']}: {p['status']}" + (f", {p['seconds']:.1f} s" if p.get("seconds") else ""))


@app.command()
def stop(run_url: str, endpoint_url: EndpointOpt = None, region: RegionOpt = None) -> None:
    """Ask a running run to stop after a last checkpoint (its driver polls the run store)."""
    store = open_store(run_url, endpoint_url, region)
    with one_line_errors(run_url):
        store.request_stop()
    typer.echo(f"stop requested for {run_url}; the run ends STOPPED after its next checkpoint")


@app.command()
def runs(
    storage: Annotated[str, typer.Argument(help="run store root: path, file:// or s3://bucket/prefix (a spec's storage:)")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
) -> None:
    """List the runs under a run store: name, state, phase, resolution, images, last commit age."""
    import time

    from rich.console import Console
    from rich.table import Table

    from service.run_list import RunListError, format_age, list_runs
    from service.run_list import as_json as runs_json

    try:
        rows, skipped = list_runs(storage, StorageOptions(endpoint_url=endpoint_url, region=region))
    except RunListError as e:
        raise fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps(runs_json(storage, rows, skipped), indent=2))
        return
    table = Table(title=f"{storage}: {len(rows)} run(s)")
    for col, justify in (("run", "left"), ("state", "left"), ("phase", "left"), ("res", "right"),
                         ("images", "right"), ("last commit", "right")):
        table.add_column(col, justify=justify)
    now = time.time()
    for r in rows:
        table.add_row(r.name, r.state, r.phase, f"{r.resolution}²" if r.resolution else "?", str(r.images),
                      format_age(None if r.last_commit_at is None else now - r.last_commit_at))
    Console().print(table)
    if skipped:
        typer.echo(f"not runs (no state.json): {', '.join(skipped)}")


PhaseOpt = Annotated[Optional[str], typer.Option("--phase", help="phase index or name; default: the last committed")]
SeedOpt = Annotated[int, typer.Option(help="seed of the latents")]


def open_phase(run_url: str, phase: str | None, endpoint_url: str | None, region: str | None):
    """(store, spec, phase, EMA generator) of a committed phase of a run, or a one-line error."""
    from service.artifacts import device, phase_generator, resolve_phase

    store = open_store(run_url, endpoint_url, region)
    with one_line_errors(run_url):
        spec = store.read_spec()
        chosen = resolve_phase(store, spec, phase)
        return store, spec, chosen, phase_generator(store, spec, chosen, device())


def write_file(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as e:
        raise fail(f"cannot write {path}: {e.strerror}") from None


@app.command()
def sample(
    run_url: str,
    phase: PhaseOpt = None,
    n: Annotated[int, typer.Option("--n", help="number of samples, tiled into ceil(sqrt N) rows")] = 64,
    seed: SeedOpt = 0,
    out: Annotated[Optional[Path], typer.Option(help="PNG file; default samples-<phase>.png")] = None,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
) -> None:
    """Write a grid of samples from the EMA generator of a committed phase."""
    from service.artifacts import generate, grid_png, latents

    if not 1 <= n <= MAX_SAMPLES:
        raise fail(f"--n must be from 1 to {MAX_SAMPLES}, got {n}")
    _, spec, chosen, G = open_phase(run_url, phase, endpoint_url, region)
    out = out or Path(f"samples-{chosen.name}.png")
    write_file(out, grid_png(generate(G, latents(n, spec.latent_size, seed))))
    typer.echo(f"{out}: {n} samples of phase {chosen.name} ({chosen.resolution}x{chosen.resolution})")


@app.command()
def interpolate(
    run_url: str,
    phase: PhaseOpt = None,
    keyframes: Annotated[int, typer.Option(help="latents to pass through, looping back to the first")] = 4,
    steps: Annotated[int, typer.Option(help="frames from one keyframe to the next")] = 8,
    seed: SeedOpt = 0,
    out: Annotated[Optional[str], typer.Option(help="OUT.png strip, OUT.gif; default interpolation-<phase>")] = None,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
) -> None:
    """Slerp between random latents through the EMA generator of a committed phase: a PNG strip and a GIF."""
    from service.artifacts import GIF_FRAME_MS, interpolation_frames, latents
    from workers.evaluate import encode_gif, encode_png, image_grid

    if not 2 <= keyframes <= MAX_KEYFRAMES:
        raise fail(f"--keyframes must be from 2 to {MAX_KEYFRAMES}, got {keyframes}")
    if not 1 <= steps <= MAX_STEPS:
        raise fail(f"--steps must be from 1 to {MAX_STEPS}, got {steps}")
    _, spec, chosen, G = open_phase(run_url, phase, endpoint_url, region)
    frames = interpolation_frames(G, latents(keyframes, spec.latent_size, seed), steps)
    prefix = out or f"interpolation-{chosen.name}"
    write_file(Path(f"{prefix}.png"), encode_png(image_grid(frames, rows=1)))
    write_file(Path(f"{prefix}.gif"), encode_gif(frames, GIF_FRAME_MS))
    typer.echo(f"{prefix}.png, {prefix}.gif: {len(frames)} frames of phase {chosen.name}")


@app.command("eval")
def evaluate(
    run_url: str,
    dataset: Annotated[Optional[str], typer.Option(help="dataset URL of the real images; default: the run's")] = None,
    phase: PhaseOpt = None,
    metrics: Annotated[Optional[str], typer.Option(help="comma-separated: swd, msssim (default: both)")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="generated and real images each (default: 1024)")] = None,
    paper: Annotated[bool, typer.Option("--paper", help="SWD as the paper reports it: 16384 images (or all the "
                                        "dataset holds), 4 x 128 directions, reals mirrored if the run does")] = False,
    seed: SeedOpt = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
) -> None:
    """SWD (per level and average, x1e3) against real images, and MS-SSIM diversity of generated and real images."""
    from rich.console import Console
    from rich.table import Table

    from service.artifacts import evaluate as run_evaluation
    from service.artifacts import paper_swd

    if paper and n is not None:
        raise fail("--paper takes 16384 images (or all the dataset holds); leave out --n")
    if paper and metrics is not None and {m.strip() for m in metrics.split(",") if m.strip()} != {"swd"}:
        raise fail("--paper measures SWD only; leave out --metrics or give --metrics swd")
    if n is not None and not 1 <= n <= MAX_EVAL_IMAGES:
        raise fail(f"--n must be from 1 to {MAX_EVAL_IMAGES}, got {n}")
    store, spec, chosen, G = open_phase(run_url, phase, endpoint_url, region)
    with one_line_errors(dataset or spec.dataset):
        if paper:
            result = paper_swd(G, spec, chosen, dataset or spec.dataset, seed=seed, options=store.options)
        else:
            result = run_evaluation(
                G, spec, chosen, dataset or spec.dataset, 1024 if n is None else n,
                {m.strip() for m in (metrics or "swd,msssim").split(",") if m.strip()}, seed=seed,
                options=store.options,
            )
    if as_json:
        typer.echo(json.dumps({"run": store.url, "dataset": dataset or spec.dataset, **result}, indent=2))
        return
    res = chosen.resolution
    table = Table(title=f"{store.url} phase {chosen.name}: {result['images']} images at {res}x{res}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for level, value in result.get("swd", {}).items():
        table.add_row(f"SWD {level if level == 'avg' else f'{level}x{level}'} (x1e3)", f"{value:.2f}")
    if "swd_setup" in result:
        setup = result["swd_setup"]
        table.add_row("SWD setup", f"{setup['images']} images, {setup['repeats']} x {setup['directions']} directions, "
                                   f"reals {'mirrored' if setup['mirrored'] else 'unmirrored'}"
                                   f"{', as the paper' if setup['paper'] else ''}")
    if "ms_ssim" in result:
        table.add_row("MS-SSIM generated (lower: more varied)", f"{result['ms_ssim']['generated']:.4f}")
        table.add_row("MS-SSIM real", f"{result['ms_ssim']['real']:.4f}")
    Console().print(table)


k8s_app = typer.Typer(help="Kubernetes (KubeRay) manifests.", no_args_is_help=True)
app.add_typer(k8s_app, name="k8s")


@k8s_app.command("render")
def k8s_render(
    spec: Path,
    image: Annotated[str, typer.Option(help="container image with this project installed")] = "progan-service:0.1.0",
    namespace: Annotated[Optional[str], typer.Option(help="namespace of the objects")] = None,
    gpus_per_node: Annotated[int, typer.Option(help="GPUs of a node: a worker pod holds them all")] = 8,
    nodes: Annotated[Optional[int], typer.Option(help="GPU nodes (worker pods); default: what the spec's workers fill")] = None,
    autoscale: Annotated[bool, typer.Option(help="KubeRay's autoscaler starts worker pods as phases need them")] = False,
    name: Annotated[Optional[str], typer.Option(help="name of the RayJob; default: progan-RUN")] = None,
) -> None:
    """Print SPEC's ConfigMap, ServiceAccount, NetworkPolicy and the RayJob that trains it:
    `progan k8s render my.yaml | kubectl apply -f -`."""
    from service.k8s import render_rayjob

    try:
        typer.echo(render_rayjob(spec, image=image, namespace=namespace, gpus_per_node=gpus_per_node, nodes=nodes,
                                 autoscale=autoscale, name=name), nl=False)
    except (SpecError, ValueError, OSError) as e:
        raise fail(str(e)) from None


if __name__ == "__main__":
    app()
