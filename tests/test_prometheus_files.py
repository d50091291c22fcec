"""The files in deploy/: alert rules (promtool unit tests), scrape config, the generated dashboard, and the
README's metrics table against the worker's registry."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.conftest import require_tool
from worker import dashboard, metrics

ROOT = Path(__file__).parent.parent
PROMETHEUS = ROOT / "deploy/prometheus"


def exposed_metric_names() -> set[str]:
    """Every metric the worker can expose, as written in queries (counters with _total)."""
    names = {metrics.RecentJobs.NAME, *metrics.ReadAtScrape.HELP}
    for family in metrics.REGISTRY.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_alert_rules_pass_their_unit_tests() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "test", "rules", "tests/vbs-deleter.test.yml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_config_and_rules_are_valid() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_dashboard_file_matches_the_generator() -> None:
    committed = (ROOT / "deploy/grafana/dashboards/vbs-deleter.json").read_text()
    assert committed == dashboard.render(), "regenerate it: .venv/bin/python -m worker.dashboard"


def test_queries_and_rules_use_only_defined_metrics() -> None:
    known = exposed_metric_names() | {"up"}
    texts = [q.expr for panel in dashboard.PANELS for q in panel.queries]
    texts.append((PROMETHEUS / "rules/vbs-deleter.rules.yml").read_text())
    used = {name for text in texts for name in re.findall(r"\b(vbs_deleter_[a-z_]+|up)\b", text)}
    histogram_parts = {n for n in used if re.sub(r"_(bucket|sum|count)$", "", n) in known}
    assert used - known - histogram_parts == set()


def test_readme_metrics_table_lists_exactly_the_metrics() -> None:
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `(vbs_deleter_[a-z_]+)` \|", readme, flags=re.MULTILINE))
    assert listed == exposed_metric_names()
