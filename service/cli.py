"""`progan`: the command line. Each command validates its input at this boundary and exits 2 with one line
naming the problem; the work itself lives in the modules it calls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from service.spec import SpecError, StorageOptions, load_spec

app = typer.Typer(help="Progressive GAN training on Ray.", no_args_is_help=True, add_completion=False)

EndpointOpt = Annotated[Optional[str], typer.Option("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")]
RegionOpt = Annotated[Optional[str], typer.Option("--region", help="S3 region")]


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean "your input is wrong", as opposed to a bug."""
    from service.coordinator import CoordinatorError
    from service.runstore import RunStoreError
    from workers.data import DatasetError

    return (SpecError, DatasetError, CoordinatorError, RunStoreError)


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
        typer.echo(json.dumps({"run": s.run, "phases": rows}, indent=2))
        return
    table = Table(title=f"{s.run}: 4² → {s.resolution}², {len(phases)} phases")
    for col in ("phase", "res", "kind", "kimg", "batch", "per worker", "lr", "workers"):
        table.add_column(col, justify="right")
    for p in phases:
        table.add_row(p.name, str(p.resolution), p.kind, f"{p.images / 1000:g}", str(p.batch),
                      str(p.batch_per_worker), f"{p.lr:g}", str(p.workers))
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
    overwrite: Annotated[bool, typer.Option(help="replace a complete dataset at DEST")] = False,
    endpoint_url: EndpointOpt = None,
    region: RegionOpt = None,
) -> None:
    """Write a multi-resolution WebDataset (one shard set per resolution) from images."""
    from workers.prepare import prepare as run_prepare

    try:
        manifest = run_prepare(
            source, dest, resolution=resolution, channels=channels, shard_size=shard_size, limit=limit, seed=seed,
            workers=workers, overwrite=overwrite, storage_options=StorageOptions(endpoint_url=endpoint_url, region=region),
        )
    except user_errors() as e:
        raise fail(str(e)) from None
    typer.echo(f"{dest}: {manifest.count} images at {manifest.resolutions}, {len(manifest.skipped)} skipped")


@app.command()
def train(
    spec: Path,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address; default: RAY_ADDRESS or a new local cluster")] = None,
    new_run: Annotated[bool, typer.Option("--new-run", help="delete the stored run of this name and start over")] = False,
    metrics_port: Annotated[Optional[int], typer.Option(help="override the spec's metrics_port (0: any free port)")] = None,
) -> None:
    """Train a job spec to the end; the same spec again resumes it."""
    from service.coordinator import train as run_training
    from service.schedule import Status

    try:
        s = load_spec(spec)
        state = run_training(s, address=address, new_run=new_run, metrics_port=metrics_port)
    except user_errors() as e:
        raise fail(str(e)) from None
    typer.echo(f"{s.run_url}: {state.status.value}")
    if state.status is Status.STOPPED:
        raise typer.Exit(0)
    if state.status is not Status.FINISHED:
        raise typer.Exit(1)


def open_store(run_url: str, endpoint_url: str | None, region: str | None):
    from service.runstore import RunStore

    store = RunStore(run_url, StorageOptions(endpoint_url=endpoint_url, region=region))
    if not store.exists():
        raise fail(f"{run_url} is not a run: it has no state.json")
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
    store.request_stop()
    typer.echo(f"stop requested for {run_url}; the run ends STOPPED after its next checkpoint")


k8s_app = typer.Typer(help="Kubernetes (KubeRay) manifests.", no_args_is_help=True)
app.add_typer(k8s_app, name="k8s")


@k8s_app.command("render")
def k8s_render(
    spec: Path,
    image: Annotated[str, typer.Option(help="container image with this project installed")] = "progan-service:0.1.0",
    namespace: Annotated[Optional[str], typer.Option(help="namespace of the objects")] = None,
    gpus_per_worker: Annotated[int, typer.Option(help="GPUs per worker pod when the spec uses GPUs")] = 1,
) -> None:
    """Print a ConfigMap with SPEC and a RayJob that trains it: `progan k8s render my.yaml | kubectl apply -f -`."""
    from service.k8s import render_rayjob

    try:
        typer.echo(render_rayjob(spec, image=image, namespace=namespace, gpus_per_worker=gpus_per_worker), nl=False)
    except (SpecError, ValueError) as e:
        raise fail(str(e)) from None


if __name__ == "__main__":
    app()
