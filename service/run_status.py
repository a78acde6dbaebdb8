"""`progan status`: what the run store says about a run, plus live figures from its metrics endpoint."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from service.runstore import RunStore
from service.schedule import Status, build_schedule


def live_figures(metrics_url: str) -> dict[str, float]:
    """progan_* samples of a running run, or {} when its endpoint cannot be reached."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("progan_") and "state" not in s.labels and "kind" not in s.labels}


def describe(store: RunStore) -> dict:
    spec, state = store.read_spec(), store.read_state()
    phases = build_schedule(spec)
    current = phases[state.phase]
    committed = {r.index: r for r in state.committed}
    driver = store.read_driver()
    report = {
        "run": store.url,
        "state": state.status.value + (f" ({state.reason})" if state.reason else ""),
        "phase": f"{current.index} of {len(phases)}: {current.name}",
        "resolution": current.resolution,
        "kind": current.kind,
        "last committed": store.url_of(store.layout.checkpoint(phases[state.last_committed.index]))
        if state.last_committed else "none",
        "worker restarts": state.restarts,
        "metrics": driver.get("metrics", "none"),
    }
    live = live_figures(driver["metrics"]) if state.status is Status.RUNNING and "metrics" in driver else {}
    if live:
        report["alpha"] = round(live.get("progan_fade_alpha", float("nan")), 4)
        report["images"] = f"{live.get('progan_phase_images_seen', 0):.0f} / {current.images} in phase, " \
                           f"{live.get('progan_run_images_seen', 0):.0f} / {sum(p.images for p in phases)} in run"
        report["images/s"] = round(live.get("progan_train_images_per_second", 0.0), 1)
    elif state.status is Status.FINISHED:
        report["alpha"], report["images"] = 1.0, f"{sum(p.images for p in phases)} (all phases)"
    report["phases"] = [
        {"name": p.name, "status": "committed" if p.index in committed else
         ("running" if p.index == state.phase and state.status is Status.RUNNING else "pending"),
         "seconds": committed[p.index].seconds if p.index in committed else None}
        for p in phases
    ]  # fmt: skip
    return report
