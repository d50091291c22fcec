"""Retention: the pure rules, schedules, and plan/run/beat against the simulator, Redis and a worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import PROJECT, Sim, Worker
from tests.test_submit import queued
from worker import processes
from worker.retention import Policy, PolicyError, load_policies, plan
from worker.schedule import Cron, Schedule, parse_interval
from worker.scrape import by_label, scrape, total
from worker.vbs import next_query

NOW = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
OTHER = "fedcba9876543210fedcba9876543210"
VOL_A, VOL_B = "aaaaaaaa-0000-4000-8000-000000000001", "bbbbbbbb-0000-4000-8000-000000000002"


def backup(
    age_days: float,
    name: str = "autobk_x",
    status: str = "available",
    volume: str = VOL_A,
    dependants: bool = False,
    incremental: bool = False,
) -> dict[str, Any]:
    """A listed backup as VBS renders it (naive UTC timestamps)."""
    created = (NOW - timedelta(days=age_days)).replace(tzinfo=None)
    return {
        "id": str(uuid.uuid4()),
        "name": name,
        "status": status,
        "volume_id": volume,
        "created_at": created.strftime("%Y-%m-%dT%H:%M:%S.%f"),
        "has_dependent_backups": dependants,
        "is_incremental": incremental,
    }


def policy(**overrides: Any) -> Policy:
    return Policy(**{"project_id": PROJECT, "keep_days": 30, "every": "1d", **overrides})


def decided(listing: list[dict[str, Any]], **overrides: Any) -> dict[str, tuple[str, str]]:
    """backup ID -> (action, reason) for the candidates of a plan over ``listing``."""
    return {d.backup_id: (d.action, d.reason) for d in plan("p", policy(**overrides), listing, NOW).decisions}


DELETE = ("delete", "expired")

# --- pure rules ---


def test_age_is_computed_in_utc_from_naive_timestamps() -> None:
    old, young = backup(30.001), backup(29.999)
    aware = backup(31)
    aware["created_at"] = (NOW - timedelta(days=31)).astimezone(UTC).isoformat()
    assert decided([old, young, aware]) == {old["id"]: DELETE, aware["id"]: DELETE}


def test_statuses_default_and_custom() -> None:
    listing = [backup(40, status=s) for s in ("available", "error", "creating", "deleting", "restoring")]
    ok, error = listing[0]["id"], listing[1]["id"]
    assert decided(listing) == {ok: DELETE, error: DELETE}
    assert decided(listing, statuses=["error"]) == {error: DELETE}
    with pytest.raises(ValueError, match="subset"):
        policy(statuses=["creating"])


def test_name_and_volume_patterns() -> None:
    auto, manual, keep = backup(40, "autobk_1"), backup(40, "manual-1"), backup(40, "autobk_keep")
    other_volume = backup(40, "autobk_2", volume=VOL_B)
    listing = [auto, manual, keep, other_volume]
    assert decided(listing, include_names=["autobk_*"], exclude_names=["*keep*"]) == {
        auto["id"]: DELETE,
        other_volume["id"]: DELETE,
    }
    assert decided(listing, include_volumes=["bbbbbbbb-*"]) == {other_volume["id"]: DELETE}
    assert set(decided(listing, exclude_volumes=[VOL_B])) == {auto["id"], manual["id"], keep["id"]}


def test_keep_newest_per_volume_counts_available_backups_only() -> None:
    a = [backup(40 + i) for i in range(4)]  # a[0] newest
    broken = backup(39, status="error")
    b = [backup(50, volume=VOL_B)]
    got = decided([*a, broken, *b], keep_newest=2)
    assert got == {
        a[0]["id"]: ("skip", "keep_newest"),
        a[1]["id"]: ("skip", "keep_newest"),
        a[2]["id"]: DELETE,
        a[3]["id"]: DELETE,
        broken["id"]: DELETE,
        b[0]["id"]: ("skip", "keep_newest"),
    }


def test_chain_newest_member_first_parents_wait() -> None:
    full = backup(45, dependants=True)
    inc1 = backup(44, dependants=True, incremental=True)
    inc2 = backup(43, incremental=True)
    assert decided([full, inc1, inc2]) == {
        inc2["id"]: DELETE,
        inc1["id"]: ("skip", "waiting_for_dependants"),
        full["id"]: ("skip", "waiting_for_dependants"),
    }


def test_chain_with_a_kept_member_is_not_touched() -> None:
    full = backup(45, dependants=True)
    inc1 = backup(44, dependants=True, incremental=True)
    young = backup(3, incremental=True)
    next_full = backup(2)  # a new chain: not a dependant of the old one
    assert decided([full, inc1, young, next_full]) == {
        full["id"]: ("skip", "has_dependants"),
        inc1["id"]: ("skip", "has_dependants"),
    }


def test_dependants_claimed_but_none_listed_is_never_deleted() -> None:
    lone = backup(40, dependants=True)
    assert decided([lone]) == {lone["id"]: ("skip", "has_dependants")}


def test_cap_takes_the_oldest_first() -> None:
    listing = [backup(31 + i) for i in range(5)]
    result = plan("p", policy(max_deletions=2), listing, NOW)
    assert result.deletions == [listing[4]["id"], listing[3]["id"]]
    assert result.skipped == {"cap": 3}
    assert len(result.decisions) == 5


def test_unparseable_records_are_never_deleted() -> None:
    no_date, bad_flag = backup(40), backup(40)
    del no_date["created_at"]
    bad_flag["has_dependent_backups"] = "no"
    result = plan("p", policy(), [no_date, bad_flag, "junk"], NOW)
    assert result.deletions == []
    assert result.skipped == {"unparseable": 3}


def test_policy_file(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        f'[policies.daily]\nproject_id = "{PROJECT.upper()}"\nkeep_days = 7\ncron = "0 3 * * *"\n'
    )
    assert load_policies(good)["daily"].project_id == PROJECT
    for body, message in [
        (f'[policies.x]\nproject_id = "{PROJECT}"\nkeep_days = 7\n', "exactly one of every"),
        (f'[policies.x]\nproject_id = "{PROJECT}"\nkeep_days = 7\nevery = "soon"\n', "interval"),
        (f'[policies.x]\nproject_id = "{PROJECT}"\nkeep_days = 7\ncron = "0 25 * * *"\n', "0-23"),
        ('[policies.x]\nproject_id = "abc"\nkeep_days = 7\nevery = 60\n', "project_id"),
        (f'[policies.x]\nproject_id = "{PROJECT}"\nkeep_dayz = 7\nevery = 60\n', "keep_dayz"),
        ('[policies."a b"]\n', "policy name"),
        ("keep_days = 3\n", "unknown top-level"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(body)
        with pytest.raises(PolicyError, match=message):
            load_policies(bad)


def test_the_example_file_is_valid() -> None:
    policies = load_policies(Path(__file__).parent.parent / "config/retention.example.toml")
    assert policies and all(p.schedule() for p in policies.values())


# --- schedules and paging (pure) ---


def test_intervals_and_cron() -> None:
    assert [parse_interval(v) for v in (90, "90", "15m", "6h", "1d", "0.5s")] == [
        90,
        90,
        900,
        21600,
        86400,
        0.5,
    ]
    for bad in ("0", "-1h", "1w", "h"):
        with pytest.raises(ValueError):
            parse_interval(bad)
    at = datetime(2026, 12, 1, 2, 30, 15, tzinfo=UTC)  # a Tuesday
    assert Cron.parse("30 2 * * *").next_after(at) == datetime(2026, 12, 2, 2, 30, tzinfo=UTC)
    assert Cron.parse("*/20 * * * *").next_after(at) == datetime(2026, 12, 1, 2, 40, tzinfo=UTC)
    assert Cron.parse("0 4 * * 0").next_after(at) == datetime(2026, 12, 6, 4, 0, tzinfo=UTC)  # Sunday
    assert Cron.parse("0 0 1 1 *").next_after(at) == datetime(2027, 1, 1, tzinfo=UTC)
    assert Cron.parse("0 0 15 * 0").next_after(at) == datetime(2026, 12, 6, tzinfo=UTC)  # either day field
    interval = Schedule(interval=3600)
    assert interval.next_run(at, None) == at
    assert interval.next_run(at, at - timedelta(minutes=10)) == at + timedelta(minutes=50)


def test_next_link_keeps_only_the_query() -> None:
    body = {
        "backups_links": [
            {"rel": "next", "href": "https://internal:8443/v3/p/backups/detail?limit=1000&offset=1000"}
        ]
    }
    assert next_query(body) == "limit=1000&offset=1000"
    assert next_query({"backups_links": [{"rel": "self", "href": "x?y=1"}]}) is None
    assert next_query({}) is None


# --- against the simulator ---


def write_policies(path: Path, **policies: dict[str, Any]) -> Path:
    lines = []
    for name, fields in policies.items():
        lines.append(f"[policies.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in {"every": "1d", **fields}.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def retention(env: dict[str, str], *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )


@pytest.fixture
def env(sim: Sim, redis_url: str, queue: str, tmp_path: Path) -> dict[str, str]:
    return {
        "VBS_ENDPOINT": sim.url,
        "VBS_REDIS_URL": redis_url,
        "VBS_QUEUE": queue,
        "VBS_RETENTION_FILE": str(tmp_path / "retention.toml"),
    }


def test_every_rule_against_the_simulator(sim: Sim, env: dict[str, str]) -> None:
    full, inc1 = str(uuid.uuid4()), str(uuid.uuid4())
    specs: list[dict[str, Any]] = [
        {"name": "autobk_old", "age_days": 40, "volume_id": VOL_A},  # 0 delete
        {"name": "autobk_young", "age_days": 5, "volume_id": VOL_A},  # 1 too young: not a candidate
        {"name": "autobk_err", "age_days": 41, "status": "error", "volume_id": VOL_A},  # 2 delete
        {"name": "autobk_busy", "age_days": 40, "status": "restoring", "volume_id": VOL_A},  # 3 status
        {"name": "manual", "age_days": 40, "volume_id": VOL_A},  # 4 name not included
        {"name": "autobk_protect", "age_days": 40, "volume_id": VOL_A},  # 5 excluded name
        {"name": "autobk_vol", "age_days": 40, "volume_id": "excluded-volume"},  # 6 excluded volume
        {"id": full, "name": "autobk_f", "age_days": 60, "volume_id": VOL_B},  # 7 chain base
        {"id": inc1, "name": "autobk_i1", "age_days": 59, "volume_id": VOL_B, "parent_id": full},  # 8
        {"name": "autobk_i2", "age_days": 58, "volume_id": VOL_B, "parent_id": inc1},  # 9 chain leaf
    ]
    ids = sim.seed(backups=specs)
    kept = sim.seed(backups=[{"age_days": 31 + i, "volume_id": VOL_A} for i in range(4)], project=OTHER)
    write_policies(
        Path(env["VBS_RETENTION_FILE"]),
        main={
            "project_id": PROJECT,
            "keep_days": 30,
            "include_names": ["autobk_*"],
            "exclude_names": ["*protect*"],
            "exclude_volumes": ["excluded-*"],
        },
        other={"project_id": OTHER, "keep_days": 30, "keep_newest": 1, "max_deletions": 2},
    )
    result = retention(env, "retention", "plan", "--json")
    assert result.returncode == 0, result.stderr
    main, other = json.loads(result.stdout)
    assert {d["backup_id"]: (d["action"], d["reason"]) for d in main["decisions"]} == {
        ids[0]: DELETE,
        ids[2]: DELETE,
        ids[9]: DELETE,
        ids[8]: ("skip", "waiting_for_dependants"),
        ids[7]: ("skip", "waiting_for_dependants"),
    }
    assert [d["backup_id"] for d in main["decisions"] if d["action"] == "delete"] == [ids[9], ids[2], ids[0]]
    assert (main["listed"], main["candidates"], main["deletions"]) == (10, 5, 3)
    assert {d["backup_id"]: (d["action"], d["reason"]) for d in other["decisions"]} == {
        kept[0]: ("skip", "keep_newest"),
        kept[3]: DELETE,
        kept[2]: DELETE,
        kept[1]: ("skip", "cap"),
    }
    table = retention(env, "retention", "plan", "--policy", "other")
    assert table.returncode == 0, table.stderr
    assert "policy other (project " in table.stdout
    assert "candidates 4, delete 2, skipped: cap 1, keep_newest 1" in table.stdout
    assert sim.stats()["requests"]["delete"] == 0  # plan sends nothing


def test_a_chain_is_removed_newest_first_over_runs(
    sim: Sim, env: dict[str, str], start_worker: Callable[..., Worker]
) -> None:
    chain = [str(uuid.uuid4()) for _ in range(3)]
    specs = [
        {"id": backup_id, "age_days": 50 - i, "volume_id": VOL_A, "parent_id": chain[i - 1] if i else None}
        for i, backup_id in enumerate(chain)
    ]
    sim.seed(backups=[{k: v for k, v in spec.items() if v is not None} for spec in specs])
    write_policies(Path(env["VBS_RETENTION_FILE"]), chain={"project_id": PROJECT, "keep_days": 30})
    worker = start_worker(sim)
    for run, expected in enumerate(reversed(chain), start=1):
        result = retention(env, "retention", "run", "--json")
        assert result.returncode == 0, result.stderr
        [document] = json.loads(result.stdout)
        assert (document["result"], document["enqueued"]) == ("ok", 1)
        assert [d["backup_id"] for d in document["decisions"] if d["action"] == "delete"] == [expected]
        assert document["skipped"] == ({"waiting_for_dependants": 3 - run} if run < 3 else {})
        worker.wait_for_deletions(run)
    assert by_label(worker.metrics(), "vbs_deleter_deletions_total", "outcome") == {"accepted": 3}
    assert sim.stats()["remaining"][PROJECT] == 0
    assert "VolumeBackup.0107" not in worker.log()  # never refused for having dependants


def test_a_listing_over_1000_backups_is_enqueued_completely(
    sim: Sim, env: dict[str, str], redis_url: str, queue: str
) -> None:
    seeded = sim.seed(2345, age_days=40)
    sim.seed(backups=[{"age_days": 1}])  # too young
    write_policies(
        Path(env["VBS_RETENTION_FILE"]), big={"project_id": PROJECT, "keep_days": 30, "max_deletions": 5000}
    )
    result = retention(env, "retention", "run")
    assert result.returncode == 0, result.stderr
    assert "listed 2346, candidates 2345, delete 2345, skipped: none" in result.stdout
    assert "policy big: enqueued 2345 deletions" in result.stdout
    assert sim.stats()["requests"]["list"] == 3  # pages of 1000, 1000, 346
    tasks = queued(redis_url, queue)
    assert [len(kw["backup_ids"]) for _, _, kw in tasks] == [1000, 1000, 345]
    assert sorted(i for _, _, kw in tasks for i in kw["backup_ids"]) == sorted(seeded)
    assert {kw["request_id"].startswith("retention-big-") for _, _, kw in tasks} == {True}


def test_a_listing_failing_mid_way_enqueues_nothing(
    sim: Sim, env: dict[str, str], redis_url: str, queue: str
) -> None:
    sim.seed(2500, age_days=40)
    sim.configure(list_fail_after_pages=2)
    write_policies(Path(env["VBS_RETENTION_FILE"]), broken={"project_id": PROJECT, "keep_days": 30})
    result = retention(env, "retention", "run")
    assert result.returncode == 1
    assert "policy broken: listing failed, nothing enqueued: page 3 of" in result.stderr
    assert "status 500 (VolumeBackup.0103" in result.stderr
    assert redis.Redis.from_url(redis_url).llen(queue) == 0
    assert sim.stats()["requests"]["list"] == 3


def test_beat_runs_policies_on_schedule_and_exposes_metrics(
    sim: Sim, env: dict[str, str], redis_url: str, queue: str, tmp_path: Path
) -> None:
    ids = sim.seed(3, age_days=40)
    sim.seed(backups=[{"age_days": 1}])
    write_policies(
        Path(env["VBS_RETENTION_FILE"]),
        fast={"project_id": PROJECT, "keep_days": 30, "every": "1s", "max_deletions": 2},
    )
    port = processes.free_port()
    log = (tmp_path / "beat.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "beat"],
        env={**os.environ, **env, "VBS_BEAT_METRICS_PORT": str(port), "VBS_METRICS_HOST": "127.0.0.1"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    child = processes.Child(process, f"http://127.0.0.1:{port}", tmp_path / "beat.log")
    with processes.running(child):
        url = child.url + "/metrics"
        runs = "vbs_deleter_retention_runs_total"
        processes.wait_until(lambda: total(scrape(url), runs, result="ok") >= 2, 60, "two beat runs")
        samples = scrape(url)
    assert child.process.returncode == 0  # stopped cleanly by SIGTERM
    n = int(total(samples, runs, policy="fast"))
    assert n >= 2
    # no worker runs: every run sees the same 3 expired backups, enqueues the 2 oldest, caps the third
    assert total(samples, "vbs_deleter_retention_candidates_total", policy="fast") == 3 * n
    assert total(samples, "vbs_deleter_retention_enqueued_total", policy="fast") == 2 * n
    assert by_label(samples, "vbs_deleter_retention_skipped_total", "reason") == {"cap": n}
    last = total(samples, "vbs_deleter_retention_last_success_timestamp_seconds", policy="fast")
    assert abs(last - datetime.now(UTC).timestamp()) < 120
    assert total(samples, "vbs_deleter_http_requests_total", operation="list", status="200") == n
    tasks = queued(redis_url, queue)
    assert len(tasks) == n and all(kw["backup_ids"] == [ids[2], ids[1]] for _, _, kw in tasks)
    state = redis.Redis.from_url(redis_url).hgetall("vbs:retention:fast")
    assert set(state) == {b"last_attempt", b"last_success"}


def test_retention_without_a_policy_file_is_refused(env: dict[str, str]) -> None:
    result = retention({**env, "VBS_RETENTION_FILE": ""}, "retention", "plan")
    assert result.returncode == 2 and "VBS_RETENTION_FILE is not set" in result.stderr
