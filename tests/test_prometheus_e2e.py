"""A real Prometheus (Debian's binary) scrapes a worker every second during a simulator run with faults;
then every dashboard query is evaluated through the HTTP API and must return a number, and every alert
rule must evaluate without error."""

from __future__ import annotations

import json
import math
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import PROJECT, Sim, Worker, require_tool
from worker import dashboard, processes
from worker.producer import Producer

RULES = Path(__file__).parent.parent / "deploy/prometheus/rules/vbs-deleter.rules.yml"

# Queries allowed to return nothing; every metric the dashboard needs is on main, so none are pending.
PENDING: set[tuple[str, str]] = set()


def query(prometheus: processes.Child, expr: str) -> list[dict[str, Any]]:
    url = prometheus.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    answer = processes.http_json(url)
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def has_number(result: list[dict[str, Any]]) -> bool:
    return any(not math.isnan(float(series["value"][1])) for series in result)


def test_every_dashboard_query_returns_data(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer, tmp_path: Path
) -> None:
    require_tool("prometheus")
    sim = start_sim(
        *("--fault-rate", "0.2", "--job-duration", "0.4", "--job-fail-rate", "0.2", "--seed", "11"),
        *("--latency", "0.02"),
    )
    ids = sim.seed(120) + sim.seed(backups=[{"undeletable": True} for _ in range(3)])
    ids += [str(uuid.uuid4()) for _ in range(3)]
    worker = start_worker(sim, VBS_JOB_POLL_INTERVAL="0.1", VBS_CONCURRENCY="8", VBS_MAX_ATTEMPTS="10")
    config = tmp_path / "prometheus.yml"
    target = worker.child.url.removeprefix("http://")
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [{"job_name": "vbs-deleter", "static_configs": [{"targets": [target]}]}],
            }
        )
    )
    prometheus = processes.start_prometheus(config, tmp_path / "tsdb", tmp_path / "prometheus.log")
    try:
        processes.wait_until(
            lambda: has_number(query(prometheus, 'up{job="vbs-deleter"} == 1')), 60, "a first scrape"
        )
        producer.delete_backups(PROJECT, ids[:60], batch_size=10)
        for backup_id in ids[60:]:
            producer.delete_backup(PROJECT, backup_id)
        worker.wait_for_deletions(len(ids), timeout=120)
        processes.wait_until(
            lambda: query(prometheus, "sum(vbs_deleter_deletions_total)")[0]["value"][1] == str(len(ids)),
            60,
            "prometheus to see every deletion",
        )
        empty = set()
        for panel in dashboard.PANELS:
            for ref, item in enumerate(panel.queries):
                expr = item.expr.replace("$__rate_interval", "1m").replace("$instance", ".+")
                if not has_number(query(prometheus, expr)):
                    empty.add((panel.title, chr(ord("A") + ref)))
        assert empty == PENDING, f"without data: {sorted(empty - PENDING)}; no longer pending: " + str(
            sorted(PENDING - empty)
        )
        processes.wait_until(
            lambda: all(
                rule.get("lastEvaluation", "").startswith("20")
                for group in processes.http_json(prometheus.url + "/api/v1/rules")["data"]["groups"]
                for rule in group["rules"]
            ),
            30,
            "every rule evaluated",
        )
        rules = processes.http_json(prometheus.url + "/api/v1/rules")["data"]["groups"][0]["rules"]
        assert len(rules) == 7 and {rule["health"] for rule in rules} == {"ok"}, rules
    finally:
        prometheus.stop()
