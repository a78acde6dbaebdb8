"""Prometheus config, rules and alerts, checked and unit-tested with the real promtool; the exporter's scrape
passes promtool's lint."""

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from service.metrics import RunMetrics

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "deploy/prometheus"
RULES = PROMETHEUS / "rules/progan.rules.yml"
RULE_TESTS = PROMETHEUS / "rules/progan.rules.test.yml"
ALERTS = {"ProganRunStalled", "ProganLossNotFinite", "ProganLossDiverging", "ProganCheckpointStale",
          "ProganWorkerRestarts", "ProganCorruptSamplesHigh", "ProganRollbacks"}

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="promtool (Debian package prometheus) is not installed")


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], input=stdin, capture_output=True, cwd=ROOT)


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_rules_are_valid():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_rule_unit_tests_pass():
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0 and b"SUCCESS" in result.stdout, result.stdout.decode() + result.stderr.decode()


def test_config_is_valid_and_loads_the_rules():
    result = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert (PROMETHEUS / config["rule_files"][0]).resolve() == RULES
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["progan"]["static_configs"][0]["targets"] == ["127.0.0.1:9400"]
    assert "ray" in jobs


def test_alerts_are_complete():
    alerts = {rule["alert"]: rule for rule in rules() if "alert" in rule}
    assert set(alerts) == ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_recording_rules_fill_panels_quickly():
    """An end-to-end check evaluates the dashboard within ~30 s of a run's start: recording groups run every 5 s."""
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        if any("record" in rule for rule in group["rules"]):
            assert group["interval"] == "5s", group["name"]


def test_every_rule_has_a_unit_test_that_expects_a_result():
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing = {t["alertname"] for case in cases for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    quiet = {t["alertname"] for case in cases for t in case.get("alert_rule_test", []) if not t["exp_alerts"]}
    recorded = {t["expr"] for case in cases for t in case.get("promql_expr_test", []) if t["exp_samples"]}
    assert firing == ALERTS and quiet == ALERTS
    assert recorded == {rule["record"] for rule in rules() if "record" in rule}


def realistic_scrape() -> bytes:
    """An exporter mid-run: phase 5 (16² fade) of a 1024² schedule, two workers, a checkpoint, SWD, a restart."""
    m = RunMetrics("celeba-hq-1024")
    m.set_info(spec_hash="0123456789abcdef", version="0.1.0", ray="2.60.0", torch="2.13.0")
    m.set_state("running")
    m.set_phase(index=5, count=17, resolution=16, kind="fade", images_target=600_000, run_images_before=2_400_000,
                run_images_target=10_200_000)
    for rank in (0, 1):
        m.report(rank, 2, {"images_per_second": 410.5, "phase_images": 123_456, "alpha": 0.2058, "loss_g": 3.25,
                           "loss_d": -1.5, "penalty": 0.042, "corrupt_samples": 2 + rank, "stream": 7})
    m.checkpoint_committed(4.2)
    m.worker_group_restarted()
    m.set_swd({"1024": 7.1, "512": 5.3, "avg": math.nan})
    return generate_latest(m.registry)


def test_exporter_scrape_passes_promtool_lint():
    scrape = realistic_scrape()
    assert b'progan_run_state{run="celeba-hq-1024",state="running"} 1.0' in scrape
    result = promtool("check", "metrics", stdin=scrape)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
