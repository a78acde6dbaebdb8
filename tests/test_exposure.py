"""What a run exposes: the metrics endpoint's bind address, the local Ray token's file modes, what `progan status`
agrees to fetch, and credentials kept out of the spec."""

from __future__ import annotations

import http.server
import os
import stat
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from service.metrics import RunMetrics
from service.run_status import MAX_SCRAPE_BYTES, live_figures
from service.runstore import RunStore
from service.schedule import Start, build_schedule, new_run, transition
from service.spec import SpecError, parse_spec
from tests.conftest import PROGAN, ROOT, free_port

SPEC = {"run": "exposed", "dataset": "data/none", "storage": "runs", "resolution": 8, "latent_size": 8,
        "fmap_base": 16, "fmap_max": 8, "minibatch": 4, "fade_kimg": 0.004, "stable_kimg": 0.004}


def listening_addresses(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process().net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_metrics_host_defaults_to_loopback_and_the_endpoint_binds_it():
    spec = parse_spec(yaml.safe_dump(SPEC))
    assert spec.metrics_host == "127.0.0.1"
    port = RunMetrics("r").serve(0, spec.metrics_host)
    assert listening_addresses(port) == {"127.0.0.1"}
    everywhere = RunMetrics("r").serve(0, "0.0.0.0")
    assert listening_addresses(everywhere) == {"0.0.0.0"}


@pytest.mark.parametrize("host", ["localhost", "example.org", "300.1.1.1", ""])
def test_metrics_host_must_be_an_ip_address(host):
    with pytest.raises(SpecError, match=r"^spec: metrics_host: must be an IP address"):
        parse_spec(yaml.safe_dump(SPEC | {"metrics_host": host}))


@pytest.mark.parametrize("endpoint", ["http://AKIDLEAKY:s3cr3tLEAKY@minio:9000", "https://AKIDLEAKY@minio",
                                      "http://:s3cr3tLEAKY@10.0.0.1:9000"])
def test_credentials_in_the_endpoint_url_are_refused_without_repeating_them(endpoint):
    with pytest.raises(SpecError) as e:
        parse_spec(yaml.safe_dump(SPEC | {"storage_options": {"endpoint_url": endpoint}}))
    message = str(e.value)
    assert message.startswith("spec: storage_options.endpoint_url: must not carry credentials"), message
    assert "LEAKY" not in message and "\n" not in message
    assert parse_spec(yaml.safe_dump(SPEC | {"storage_options": {"endpoint_url": "http://minio:9000"}}))


# -- the Ray token file ---------------------------------------------------------------------------------------


def no_ray_auth_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return env | {"HOME": str(home), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                  "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}


def modes(home: Path) -> tuple[int, int]:
    return (stat.S_IMODE((home / ".ray").stat().st_mode), stat.S_IMODE((home / ".ray/auth_token").stat().st_mode))


def test_ray_local_sh_writes_a_private_token(tmp_path):
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    fresh.mkdir()
    (old / ".ray").mkdir(parents=True)
    (old / ".ray/auth_token").write_text("a" * 32)
    (old / ".ray").chmod(0o755)
    (old / ".ray/auth_token").chmod(0o644)  # written by an earlier version, readable by everyone
    for home in (fresh, old):
        result = subprocess.run([str(ROOT / "deploy/ray-local.sh"), "token"], env=no_ray_auth_env(home),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert modes(home) == (0o700, 0o600), home
    assert (old / ".ray/auth_token").read_text() == "a" * 32  # kept, not replaced


@pytest.mark.slow
def test_a_cluster_of_our_own_writes_a_private_token(tmp_path):
    """ray.init starts a local cluster with token auth on and writes a new token to ~/.ray/auth_token."""
    script = ("import os, ray; from service.coordinator import start_own_cluster; start_own_cluster(); "
              "print(oct(os.umask(0o022))); ray.shutdown()")
    umask = os.umask(0o022)
    os.umask(umask)
    result = subprocess.run([sys.executable, "-c", script], env=no_ray_auth_env(tmp_path), cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert modes(tmp_path) == (0o700, 0o600)
    assert result.stdout.split()[-1] == oct(umask)  # the driver's own files keep the user's umask


# -- progan status fetches only the recorded http(s) address ----------------------------------------------------


def running_run(tmp_path: Path, metrics: object) -> str:
    spec = parse_spec(yaml.safe_dump(SPEC | {"storage": str(tmp_path / "runs")}))
    store = RunStore(spec.run_url, spec.storage_options)
    store.write_spec(spec)
    store.write_state(transition(new_run(len(build_schedule(spec))), Start()))
    store.write_driver({"metrics": metrics, "started_at": 0})
    return spec.run_url


def status(run_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROGAN, "status", run_url, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("address", ["file:///etc/passwd", "ftp://127.0.0.1/metrics", "data:,progan_x 1",
                                     "/etc/passwd", "http://", 42])
def test_status_refuses_a_recorded_address_that_is_not_http(tmp_path, address):
    run_url = running_run(tmp_path, address)
    result = status(run_url, "--json")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert "driver.json: the metrics address has" in result.stderr and "only http(s) is fetched" in result.stderr
    assert "root:" not in result.stderr  # the file was never read


class Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, dict, bytes]] = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        code, headers, body = self.routes[self.path]
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def web():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_status_shows_live_figures_from_a_real_endpoint(tmp_path):
    metrics = RunMetrics("exposed")
    metrics.set_phase(1, 3, 8, "fade", 4000, 0, 12000)
    metrics.report(0, 1, {"phase_images": 1000, "alpha": 0.25, "images_per_second": 12.5})
    port = metrics.serve(0)
    assert live_figures(f"http://127.0.0.1:{port}/metrics")["progan_fade_alpha"] == 0.25
    result = status(running_run(tmp_path, f"http://127.0.0.1:{port}/metrics"), "--json")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["alpha"] == 0.25


def test_status_does_not_follow_redirects_or_read_without_bound(tmp_path, web):
    small = b"progan_fade_alpha{run=\"x\"} 0.5\n"
    Handler.routes = {
        "/ok": (200, {}, small),
        "/redirect": (302, {"Location": "file:///etc/passwd"}, b""),
        "/elsewhere": (302, {"Location": web + "/ok"}, b""),
        "/huge": (200, {}, b"# padding\n" * (MAX_SCRAPE_BYTES // 10 + 1) + small),
        "/garbage": (200, {}, b"\x00\xff{not prometheus\n"),
    }
    assert live_figures(web + "/ok") == {"progan_fade_alpha": 0.5}
    for path in ("/redirect", "/elsewhere", "/huge", "/garbage"):
        assert live_figures(web + path) == {}, path
    assert live_figures(f"http://127.0.0.1:{free_port()}/metrics") == {}  # nothing listens
    result = status(running_run(tmp_path, web + "/redirect"), "--json")
    assert result.returncode == 0 and "alpha" not in yaml.safe_load(result.stdout), result.stdout + result.stderr
    with urllib.request.urlopen(web + "/huge", timeout=5) as r:
        assert len(r.read()) > MAX_SCRAPE_BYTES  # the server did send it all
