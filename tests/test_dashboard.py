"""The Grafana dashboard: provisionable as is, one run at a time, and asking only for series that exist."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from tests.dashboard_queries import dashboard_queries, fill, panels
from service.metrics import RunMetrics

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/grafana/progan-training.json"
RULES = ROOT / "deploy/prometheus/rules/progan.rules.yml"
PROVISIONING = ROOT / "deploy/grafana/provisioning"
SUFFIXES = {"counter": [""], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count"]}
SELECTOR = re.compile(r"\b(progan[_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def exported_names() -> set[str]:
    """Every series name a RunMetrics endpoint can serve, from the TYPE lines of its scrape (a labelled metric
    without children still has them)."""
    text = generate_latest(RunMetrics("x").registry).decode()
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.update(name + suffix for suffix in SUFFIXES[kind])
    return names


def recorded_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def all_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) of every panel target and annotation, unfilled."""
    exprs = [(p["title"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]
    exprs += [(f"annotation {a['name']}", a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a]
    return exprs


def test_dashboard_has_a_stable_uid_and_its_variables(dashboard):
    assert dashboard["uid"] == "progan-training"
    assert dashboard["id"] is None  # provisioning assigns the id; a fixed one would clash
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    run = variables["run"]
    assert run["type"] == "query" and run["definition"] == "label_values(progan_run_state, run)"
    assert run["query"]["query"] == run["definition"]
    assert run["datasource"]["uid"] == "${datasource}"
    assert not run["multi"] and not run["includeAll"]  # every query filters on exactly one run


def test_every_panel_has_a_query_on_the_datasource_variable(dashboard):
    found = list(panels(dashboard))
    assert len(found) >= 15
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in found:
        assert panel["title"] and panel["targets"], panel.get("title")
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_panels_cover_the_run(dashboard):
    text = " ".join(expr for _, expr in all_exprs(dashboard))
    for needed in ("progan_run_state", "progan_phase_index", "progan_resolution_pixels", "progan_fade_alpha",
                   "progan:phase_progress:ratio", "progan:run_progress:ratio", "progan:phase_eta:seconds",
                   "progan:run_eta:seconds", "progan_loss_generator", "progan_loss_discriminator",
                   "progan_gradient_penalty", "progan_train_images_per_second", "progan_worker_images_per_second",
                   "progan_checkpoint_last_success_timestamp_seconds", "progan_checkpoint_duration_seconds_bucket",
                   "progan_worker_group_restarts_total", "progan_corrupt_samples_total", "progan_swd",
                   "progan_nonfinite_steps_total", "progan_rollbacks_total"):
        assert needed in text, needed
    annotations = [a for a in dashboard["annotations"]["list"] if "expr" in a]
    assert any("changes(progan_phase_index" in a["expr"] for a in annotations)


def test_every_query_selects_one_run(dashboard):
    for where, expr in all_exprs(dashboard):
        selectors = SELECTOR.findall(expr)
        assert selectors, f"{where}: {expr}"
        for name, matchers in selectors:
            assert 'run="$run"' in matchers, f"{where}: {name} is not filtered by run in {expr}"


def test_queries_ask_only_for_exported_or_recorded_series(dashboard):
    known = exported_names() | recorded_names()
    assert "progan_checkpoint_duration_seconds_bucket" in known and "progan_corrupt_samples_total" in known
    for where, expr in all_exprs(dashboard):
        for name, _ in SELECTOR.findall(expr):
            assert name in known, f"{where}: {name} is neither exported by RunMetrics nor recorded"


def test_a_misnamed_metric_is_caught():
    known = exported_names() | recorded_names()
    names = [name for name, _ in SELECTOR.findall('rate(progan_corrupt_samples{run="$run"}[5m])')]
    assert names == ["progan_corrupt_samples"] and names[0] not in known


def test_dashboard_queries_fills_run_and_macros():
    queries = dashboard_queries(DASHBOARD, "celeba-hq")
    titles = {title for title, _ in queries}
    assert {"Run state", "Losses", "Checkpoint duration", "annotation: Phase transitions"} <= titles
    for title, expr in queries:
        assert "$" not in expr and "[[" not in expr, f"{title}: {expr}"
        assert 'run="celeba-hq"' in expr, f"{title}: {expr}"
    assert fill('rate(x{run="$run"}[$__rate_interval]) + y{run="${run}"}[$__range] + z[${__interval}] / $__range_s',
                "a") == 'rate(x{run="a"}[1m]) + y{run="a"}[1h] + z[15s] / 3600'


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed")
def test_every_query_parses_as_promql(tmp_path):
    """promtool parses each filled-in query as the expression of a recording rule."""
    rules = [{"record": f"dashboard:query_{i}", "expr": expr}
             for i, (_, expr) in enumerate(dashboard_queries(DASHBOARD, "x"))]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_provisioning_files():
    datasources = yaml.safe_load((PROVISIONING / "datasources/prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")
    providers = yaml.safe_load((PROVISIONING / "dashboards/progan.yaml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    readme = (ROOT / "deploy/README.md").read_text()
    assert provider["options"]["path"] in readme  # the documented `docker run` mounts the dashboards there
