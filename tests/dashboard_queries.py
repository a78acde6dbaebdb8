"""The PromQL behind a Grafana dashboard, ready to send to Prometheus: a helper for the dashboard tests."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

# What Grafana puts in place of its macros; chosen for a Prometheus that scrapes every 5 s and has minutes of data.
MACROS = {
    "rate_interval": "1m",
    "interval": "15s",
    "interval_ms": "15000",
    "range": "1h",
    "range_s": "3600",
    "range_ms": "3600000",
}
_NAMES = "|".join(sorted(MACROS, key=len, reverse=True))
_MACRO = re.compile(rf"\$(?:\{{__({_NAMES})\}}|__({_NAMES})\b)")


def panels(dashboard: dict) -> Iterator[dict]:
    """Every panel that is not a row, including those inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") != "row":
            yield panel
        yield from panels(panel)


def fill(expr: str, run: str) -> str:
    """Put a run name and Grafana's macros into a query."""
    expr = re.sub(r"\$\{run\}|\$run\b|\[\[run\]\]", run, expr)
    return _MACRO.sub(lambda m: MACROS[m.group(1) or m.group(2)], expr)


def dashboard_queries(path: str | Path, run: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every visible query of every panel, then ("annotation: <name>", PromQL) for every
    Prometheus annotation, with `$run` filled in and Grafana's macros replaced by the values in MACROS."""
    dashboard = json.loads(Path(path).read_text())
    queries = [
        (panel["title"], fill(target["expr"], run))
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if not target.get("hide") and target.get("expr")
    ]
    for annotation in dashboard.get("annotations", {}).get("list", []):
        expr = annotation.get("expr") or annotation.get("target", {}).get("expr")
        if expr:
            queries.append((f"annotation: {annotation['name']}", fill(expr, run)))
    return queries
