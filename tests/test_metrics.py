"""The run's exporter: what it serves over HTTP, NaN kept as NaN, counters that survive worker restarts."""

from __future__ import annotations

import math
import socket
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import MetricsPortInUse, RunMetrics
from tests.conftest import free_port


def samples(text: str) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def serve(metrics: RunMetrics) -> str:
    port = metrics.serve(0, addr="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def test_served_scrape_is_lint_clean_and_keeps_nan():
    m = RunMetrics("r")
    m.set_phase(3, 7, 16, "fade", 1000, 3000, 7000)
    m.report(0, 2, {"phase_images": 250, "alpha": 0.25, "images_per_second": 50.0, "loss_g": math.nan,
                    "loss_d": math.inf, "penalty": 0.5, "corrupt_samples": 0})
    m.set_state("running")
    text = serve(m)
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    got = samples(text)
    assert math.isnan(got[("progan_loss_generator", (("run", "r"),))])
    assert got[("progan_loss_discriminator", (("run", "r"),))] == math.inf
    assert got[("progan_fade_alpha", (("run", "r"),))] == 0.25
    assert got[("progan_run_images_seen", (("run", "r"),))] == 3250
    assert got[("progan_train_images_per_second", (("run", "r"),))] == 100.0
    assert got[("progan_run_state", (("run", "r"), ("state", "running")))] == 1
    assert got[("progan_run_state", (("run", "r"), ("state", "pending")))] == 0
    assert got[("progan_phase_kind", (("kind", "fade"), ("run", "r")))] == 1


def test_corrupt_samples_count_across_ranks_and_restarted_streams():
    m = RunMetrics("r")
    base = {"phase_images": 0, "alpha": 1.0, "images_per_second": 1.0}
    m.report(0, 2, dict(base, corrupt_samples=3, stream=100))
    m.report(1, 2, dict(base, corrupt_samples=2, stream=200))
    m.report(0, 2, dict(base, corrupt_samples=4, stream=100))
    m.report(0, 2, dict(base, corrupt_samples=1, stream=101))  # rank 0 restarted: a new stream counts from 0
    total = samples(serve(m))[("progan_corrupt_samples_total", (("run", "r"),))]
    assert total == 4 + 2 + 1


def test_port_in_use_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(MetricsPortInUse, match=f"metrics port {port} .* not available.*metrics_port"):
            RunMetrics("r").serve(port, addr="127.0.0.1")
    assert RunMetrics("r").serve(free_port(), addr="127.0.0.1") > 0
