"""`progan status`: what the run store says about a run, plus live figures from its metrics endpoint.

The endpoint's address comes from the run store's driver.json, which anyone who can write to the store can
change; so only an http(s) URL is fetched, without proxies or redirects, within a size cap and a time limit.
"""

from __future__ import annotations

import time
import urllib.request
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from service.runstore import RunStore, RunStoreError
from service.schedule import Status, build_schedule

MAX_SCRAPE_BYTES = 1 << 20  # a run's scrape is a few KiB
SCRAPE_SECONDS = 2.0


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 - urllib's signature
        return None  # a 3xx becomes an HTTPError: only the recorded address is fetched


def _http_opener() -> urllib.request.OpenerDirector:
    """An opener that speaks http(s) and nothing else (no file:, ftp:, data:), ignoring proxy settings."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler({}), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                    _NoRedirects(), urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def metrics_address(driver: dict, where: str) -> str | None:
    """The driver's recorded metrics URL, or None; anything but http(s)://host[:port]/… is refused, unread."""
    url = driver.get("metrics")
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except (TypeError, ValueError, AttributeError):
        ok, parts = False, None
    if not ok:
        scheme = f"scheme {parts.scheme!r}" if parts is not None and parts.scheme else "no http(s) address"
        raise RunStoreError(f"{where}: the metrics address has {scheme}; only http(s) is fetched, refused")
    return url


def live_figures(metrics_url: str) -> dict[str, float]:
    """progan_* samples of a running run, or {} when its endpoint cannot be reached, answers too slowly or too
    much, or does not answer with Prometheus text."""
    deadline = time.monotonic() + SCRAPE_SECONDS
    body = b""
    try:
        with _http_opener().open(metrics_url, timeout=SCRAPE_SECONDS) as r:
            while chunk := r.read(64 * 1024):
                body += chunk
                if len(body) > MAX_SCRAPE_BYTES or time.monotonic() > deadline:
                    return {}
        families = list(text_string_to_metric_families(body.decode("utf-8", "replace")))
    except (OSError, ValueError):
        return {}
    return {s.name: s.value for f in families for s in f.samples
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
        "metrics": metrics_address(driver, store.url_of(store.layout.driver)) or "none",
    }
    live = live_figures(report["metrics"]) if state.status is Status.RUNNING and "metrics" in driver else {}
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
