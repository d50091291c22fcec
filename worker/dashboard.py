"""The Grafana dashboard, generated: ``python -m worker.dashboard [PATH]`` writes it (default: the file in
deploy/grafana/dashboards/). A test checks the committed file has not drifted from :func:`build`, and
another evaluates every query of :data:`PANELS` against a real Prometheus.

Template variables: ``datasource`` (any Prometheus) and ``instance`` (worker processes, multi-select).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_PATH = Path(__file__).parent.parent / "deploy/grafana/dashboards/vbs-deleter.json"
UID = "vbs-deleter"
SEL = 'instance=~"$instance"'
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # timeseries, stat or table
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    width: int = 12


def _quantiles(metric: str, by: str = "") -> tuple[Query, ...]:
    group = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{SEL}}}[{RATE}])))",
            f"p{int(q * 100)}{suffix}",
        )
        for q in (0.5, 0.9, 0.99)
    )


PANELS: tuple[Panel, ...] = (
    Panel(
        "Deletions per second by outcome",
        "timeseries",
        (Query(f"sum by (outcome) (rate(vbs_deleter_deletions_total{{{SEL}}}[{RATE}]))", "{{outcome}}"),),
        "ops",
    ),
    Panel(
        "HTTP answers by status",
        "timeseries",
        (
            Query(
                f"sum by (operation, status) (rate(vbs_deleter_http_requests_total{{{SEL}}}[{RATE}]))",
                "{{operation}} {{status}}",
            ),
        ),
        "reqps",
        "status none: no answer (timeout, connection error)",
    ),
    Panel(
        "Failed deletions by status and error code",
        "timeseries",
        (
            Query(
                f"sum by (status, error_code) (rate(vbs_deleter_deletion_failures_total{{{SEL}}}[{RATE}]))",
                "{{status}} {{error_code}}",
            ),
        ),
        "ops",
        "status job: the deletion job ended FAIL, timed out or could not be read",
    ),
    Panel(
        "Retries by reason",
        "timeseries",
        (Query(f"sum by (reason) (rate(vbs_deleter_retries_total{{{SEL}}}[{RATE}]))", "{{reason}}"),),
        "ops",
    ),
    Panel(
        "Request latency",
        "timeseries",
        _quantiles("vbs_deleter_http_request_duration_seconds", "operation"),
        "s",
    ),
    Panel(
        "Requests in flight",
        "timeseries",
        (Query(f"sum(vbs_deleter_http_requests_in_flight{{{SEL}}})", "in flight"),),
    ),
    Panel(
        "Rate-limit utilisation",
        "timeseries",
        (
            Query(
                f"sum by (bucket) (rate(vbs_deleter_rate_limit_wait_seconds_count{{{SEL}}}[{RATE}])) "
                f"/ max by (bucket) (vbs_deleter_rate_limit_per_second{{{SEL}}})",
                "{{bucket}} share of the shared rate used",
            ),
        ),
        "percentunit",
        "tokens taken per second by the selected workers / the configured shared rate",
    ),
    Panel(
        "Rate-limit bucket level",
        "timeseries",
        (Query(f"min by (bucket) (vbs_deleter_rate_limit_tokens{{{SEL}}})", "{{bucket}} tokens left"),),
        description="tokens left at each worker's last call; at 0 every worker waits",
    ),
    Panel(
        "Rate-limit waits",
        "timeseries",
        (
            *_quantiles("vbs_deleter_rate_limit_wait_seconds", "bucket"),
            Query(
                f"sum by (bucket) (rate(vbs_deleter_rate_limit_wait_seconds_sum{{{SEL}}}[{RATE}]))",
                "{{bucket}} seconds waited per second",
            ),
        ),
        "s",
    ),
    Panel(
        "Backlog (task messages waiting)",
        "timeseries",
        (Query(f"max by (queue) (vbs_deleter_queue_messages{{{SEL}}})", "{{queue}}"),),
    ),
    Panel(
        "Estimated drain time",
        "stat",
        (
            Query(
                f"max(vbs_deleter_queue_messages{{{SEL}}}) "
                f"/ sum(rate(vbs_deleter_tasks_total{{{SEL}}}[{RATE}]))",
                "drain time",
            ),
        ),
        "s",
        "messages waiting / task messages finished per second (+Inf: not draining)",
    ),
    Panel(
        "Dead letters",
        "timeseries",
        (Query(f"max(vbs_deleter_dead_letters{{{SEL}}})", "dead letters"),),
    ),
    Panel(
        "Jobs by final status",
        "timeseries",
        (Query(f"sum by (status) (rate(vbs_deleter_jobs_total{{{SEL}}}[{RATE}]))", "{{status}}"),),
        "ops",
    ),
    Panel("Job duration", "timeseries", _quantiles("vbs_deleter_job_duration_seconds"), "s"),
    Panel(
        "Workers",
        "stat",
        (Query(f"count(vbs_deleter_build_info{{{SEL}}})", "workers"),),
        description="worker processes reporting (see the VbsDeleterWorkerDown alert for scrape failures)",
    ),
    Panel(
        "Recent jobs",
        "table",
        (Query(f"max by (job_id, backup_id, status, instance) (vbs_deleter_recent_job_info{{{SEL}}})"),),
        description="the last VBS_RECENT_JOBS deletion jobs of each worker",
        width=24,
    ),
)

_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _target(query: Query, ref: int, table: bool) -> dict[str, Any]:
    target: dict[str, Any] = {
        "datasource": _DATASOURCE,
        "expr": query.expr,
        "legendFormat": query.legend or "__auto",
        "refId": chr(ord("A") + ref),
    }
    if table:
        target.update(format="table", instant=True, range=False)
    return target


def _panel(panel: Panel, number: int, x: int, y: int) -> dict[str, Any]:
    table = panel.kind == "table"
    out: dict[str, Any] = {
        "id": number,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": _DATASOURCE,
        "gridPos": {"h": 10 if table else 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [_target(query, ref, table) for ref, query in enumerate(panel.queries)],
    }
    if table:
        out["transformations"] = [
            {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}
        ]
    return out


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (schema 39), panels laid out two per row."""
    panels: list[dict[str, Any]] = []
    x = y = 0
    for number, panel in enumerate(PANELS, start=1):
        if x + panel.width > 24:
            x, y = 0, y + 8
        panels.append(_panel(panel, number, x, y))
        x += panel.width
    return {
        "uid": UID,
        "title": "vbs-deleter",
        "description": "VBS backup deletions: throughput, failures and why, jobs, backlog, rate limiting",
        "tags": ["vbs-deleter"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                },
                {
                    "name": "instance",
                    "label": "Worker",
                    "type": "query",
                    "datasource": _DATASOURCE,
                    "query": {"query": "label_values(vbs_deleter_build_info, instance)", "refId": "instance"},
                    "definition": "label_values(vbs_deleter_build_info, instance)",
                    "refresh": 2,
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".+",
                    "current": {"text": "All", "value": "$__all"},
                    "sort": 1,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    """The dashboard file's exact text."""
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else DEFAULT_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
