"""Issue 3 guarantees with real worker processes: shared rate limit, ledger dedup, dead letters, delivery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import PROJECT, Sim, Worker
from worker import keys, processes
from worker.producer import Producer
from worker.scrape import by_label

DELETIONS = "vbs_deleter_deletions_total"
# Settings that keep the longest unacknowledged time short, so a test may use a short visibility timeout.
QUICK_REDELIVERY = {
    "VBS_MAX_ATTEMPTS": "3",
    "VBS_CONNECT_TIMEOUT": "1",
    "VBS_READ_TIMEOUT": "2",
    "VBS_BACKOFF_MAX": "0.5",
    "VBS_MAX_THROTTLE_WAITS": "0",
    "VBS_RATE_LIMIT": "0",
    "VBS_CONCURRENCY": "16",
    "VBS_HEARTBEAT_INTERVAL": "1",
    "VBS_VISIBILITY_TIMEOUT": "15",
    "VBS_FOLLOW_JOBS": "false",  # the job deadline would count into the unacked time
}


def cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "VBS_REDIS_URL": redis_url},
    )


def all_removed(sim: Sim) -> Callable[[], bool]:
    return lambda: sum(sim.stats()["remaining"].values()) == 0


def test_two_workers_share_the_limit_through_a_script_flush(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer, redis_url: str
) -> None:
    # the simulator tolerates 10 tokens of bunching (0.5 s of scheduling jitter on a loaded machine)
    sim = start_sim("--rate-limit", "20", "--rate-burst", "10")
    ids = sim.seed(120)
    limits = {"VBS_RATE_LIMIT": "20", "VBS_RATE_BURST": "3", "VBS_VISIBILITY_TIMEOUT": "5000"}
    workers = [start_worker(sim, **limits), start_worker(sim, **limits)]
    for worker in workers:  # both consume before the tasks arrive, so each gets its share
        processes.wait_until(lambda w=worker: processes.http_ok(w.child.url + "/readyz"), 30, "consuming")
    started = time.monotonic()
    for start in range(0, len(ids), 10):
        producer.delete_backups(PROJECT, ids[start : start + 10])
    processes.wait_until(lambda: sim.stats()["accepted"] >= 40, 30, "a third of the run")
    redis.Redis.from_url(redis_url).script_flush()
    processes.wait_until(all_removed(sim), 60, "every backup deleted")
    elapsed = time.monotonic() - started
    stats = sim.stats()
    assert stats["statuses"].get("429", 0) == 0
    assert stats["accepted"] == 120 and stats["deleted_more_than_once"] == 0
    assert elapsed >= (120 - 3) / 20 - 0.5  # the bucket, not the workers' speed, set the pace
    processes.wait_until(  # then each job is read once more, drawing from the same bucket
        lambda: sum(w.count(DELETIONS) for w in workers) >= 120, 60, "every deletion followed to its end"
    )
    per_worker = [by_label(w.metrics(), DELETIONS, "outcome").get("accepted", 0) for w in workers]
    assert sum(per_worker) == 120 and min(per_worker) > 0


def test_duplicate_tasks_are_not_sent_twice(
    sim: Sim, start_worker: Callable[..., Worker], producer: Producer, redis_url: str
) -> None:
    ids = sim.seed(20)
    worker = start_worker(sim)
    producer.delete_backups(PROJECT, ids, request_id="first")
    worker.wait_for_deletions(20)
    producer.delete_backups(PROJECT, ids, request_id="again")
    producer.delete_backup(PROJECT, ids[0], request_id="once-more")
    samples = worker.wait_for_deletions(41)
    assert by_label(samples, DELETIONS, "outcome") == {"accepted": 20, "duplicate": 21}
    assert sim.stats()["requests"]["delete"] == 20
    status = cli(redis_url, "status", ids[0], "--json")
    assert status.returncode == 0, status.stderr
    (record,) = json.loads(status.stdout)
    assert (record["state"], record["attempts"], record["project_id"], record["request_id"]) == (
        "accepted",
        "1",
        PROJECT,
        "first",
    )
    assert record["job_id"] and float(record["first_ts"]) <= float(record["last_ts"])
    assert cli(redis_url, "status", str(uuid.uuid4())).returncode == 1


def test_dead_letter_replay_and_purge(
    start_sim: Callable[..., Sim],
    start_worker: Callable[..., Worker],
    producer: Producer,
    redis_url: str,
    queue: str,
) -> None:
    sim = start_sim("--fault-rate", "1", "--fault-statuses", "503")
    ids = sim.seed(3)
    blocked = sim.seed(backups=[{"undeletable": True}])
    worker = start_worker(sim, VBS_MAX_ATTEMPTS="2")
    producer.delete_backups(PROJECT, [*ids, *blocked], request_id="dl-test")
    worker.wait_for_deletions(4)
    listed = json.loads(cli(redis_url, "dlq", "list", "--json").stdout)
    assert sorted((d["backup_id"], d["reason"], d["status"], d["attempts"]) for d in listed) == sorted(
        [(i, "exhausted_status_503", 503, 2) for i in ids] + [(blocked[0], "exhausted_status_503", 503, 2)]
    )
    assert {d["request_id"] for d in listed} == {"dl-test"}
    # the blocked backup now fails for good; the others will be deleted on replay
    sim.configure(fault_rate=0.0)
    env_queue = {**os.environ, "VBS_REDIS_URL": redis_url, "VBS_QUEUE": queue}
    replay = subprocess.run(
        [sys.executable, "-m", "worker.cli", "dlq", "replay", "--all"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env_queue,
    )
    assert replay.returncode == 0 and "replayed 4 deletion(s)" in replay.stdout, replay.stdout + replay.stderr
    samples = worker.wait_for_deletions(8)
    assert by_label(samples, DELETIONS, "outcome") == {"failed": 5, "accepted": 3}
    (letter,) = json.loads(cli(redis_url, "dlq", "list", "--json").stdout)
    assert (letter["backup_id"], letter["status"], letter["error_code"]) == (
        blocked[0],
        400,
        "VolumeBackup.0113",
    )
    # a replay of something deleted meanwhile is deduplicated by the ledger
    r = redis.Redis.from_url(redis_url)
    entry = {**letter, "backup_id": ids[0], "reason": "test"}
    r.hset(keys.DEAD_LETTERS, f"{PROJECT}/{ids[0]}", json.dumps(entry))
    r.zadd(keys.DEAD_LETTER_ORDER, {f"{PROJECT}/{ids[0]}": time.time()})
    again = subprocess.run(
        [sys.executable, "-m", "worker.cli", "dlq", "replay", ids[0]],
        capture_output=True,
        text=True,
        timeout=60,
        env=env_queue,
    )
    assert again.returncode == 0, again.stderr
    assert by_label(worker.wait_for_deletions(9), DELETIONS, "outcome")["duplicate"] == 1
    assert sim.stats()["accepted"] == 3
    purge = cli(redis_url, "dlq", "purge")
    assert "purged 1 dead letter(s)" in purge.stdout
    assert json.loads(cli(redis_url, "dlq", "list", "--json").stdout) == []


def test_rejected_task_is_dead_lettered_and_recorded(
    sim: Sim, start_worker: Callable[..., Worker], redis_url: str, queue: str
) -> None:
    from celery import Celery

    worker = start_worker(sim)
    backup = str(uuid.uuid4())
    app = Celery("raw", broker=redis_url, set_as_current=False)
    app.send_task(
        "vbs.delete_backup",
        kwargs={"project_id": PROJECT, "backup_id": backup, "force": True},
        queue=queue,
        task_id="task-with-extra",
    )
    processes.wait_until(lambda: worker.count("vbs_deleter_rejected_tasks_total") == 1, 20, "the rejection")
    app.close()
    (letter,) = json.loads(cli(redis_url, "dlq", "list", "--json").stdout)
    assert (letter["kind"], letter["reason"], letter["task_id"]) == (
        "rejected_task",
        "extra_kwargs",
        "task-with-extra",
    )
    assert '"force": true' in letter["kwargs"]
    (record,) = json.loads(cli(redis_url, "status", backup, "--json").stdout)
    assert record["state"] == "rejected"
    assert sim.stats()["requests"]["delete"] == 0


def test_sigkill_with_deletions_in_flight_then_another_worker(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--latency", "0.3")
    ids = sim.seed(200)
    first = start_worker(sim, **QUICK_REDELIVERY)
    for start in range(0, 200, 20):
        producer.delete_backups(PROJECT, ids[start : start + 20])
    processes.wait_until(lambda: sim.stats()["accepted"] >= 30, 30, "some deletions")
    first.child.stop(signal.SIGKILL)
    second = start_worker(sim, **QUICK_REDELIVERY)
    processes.wait_until(all_removed(sim), 120, "every backup deleted after redelivery")
    stats = sim.stats()
    assert (stats["accepted"], stats["deleted_more_than_once"]) == (200, 0)
    assert by_label(second.metrics(), DELETIONS, "outcome").get("failed", 0) == 0


def test_sigterm_finishes_in_flight_work_and_loses_nothing(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--latency", "0.3")
    ids = sim.seed(150)
    first = start_worker(sim, VBS_CONCURRENCY="8", VBS_RATE_LIMIT="0")
    for backup_id in ids:
        producer.delete_backup(PROJECT, backup_id)
    processes.wait_until(lambda: sim.stats()["accepted"] >= 20, 30, "some deletions")
    assert first.child.stop(signal.SIGTERM, timeout=60) == 0
    accepted_at_stop = sim.stats()["accepted"]
    assert accepted_at_stop < 150
    start_worker(sim, VBS_CONCURRENCY="8", VBS_RATE_LIMIT="0")
    processes.wait_until(all_removed(sim), 90, "every backup deleted")
    stats = sim.stats()
    assert (stats["accepted"], stats["deleted_more_than_once"]) == (150, 0)
    assert stats["statuses"].get("404", 0) == 0  # nothing was sent twice


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[processes.Child]:
    child = processes.start_redis(data_dir=tmp_path, appendonly=True)
    yield child
    child.stop()


def test_redis_restart_mid_run(
    start_sim: Callable[..., Sim], aof_redis: processes.Child, tmp_path: Path, queue: str
) -> None:
    sim = start_sim("--latency", "0.2")
    ids = sim.seed(300)
    port = int(aof_redis.url.rsplit(":", 1)[1].split("/")[0])
    env = {
        **QUICK_REDELIVERY,
        "VBS_REDIS_URL": aof_redis.url,
        "VBS_QUEUE": queue,
        "VBS_ENDPOINT": sim.url,
        "VBS_BACKOFF_BASE": "0.05",
    }
    worker = processes.start_worker(env, log_path=tmp_path / "worker.log")
    restarted = None
    try:
        producer = Producer(aof_redis.url, queue)
        for start in range(0, 300, 10):
            producer.delete_backups(PROJECT, ids[start : start + 10])
        producer.close()
        processes.wait_until(lambda: sim.stats()["accepted"] >= 50, 30, "some deletions")
        aof_redis.stop()
        time.sleep(2)
        restarted = processes.start_redis(port=port, data_dir=tmp_path, appendonly=True)
        processes.wait_until(all_removed(sim), 120, "every backup deleted after the restart")
        stats = sim.stats()
        assert (stats["accepted"], stats["deleted_more_than_once"]) == (300, 0)
        assert worker.process.poll() is None
    finally:
        worker.stop()
        if restarted is not None:
            restarted.stop()


def test_api_down_for_30_seconds_loses_nothing(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer, redis_url: str
) -> None:
    sim = start_sim("--fault-rate", "1", "--fault-statuses", "503")
    ids = sim.seed(100)
    worker = start_worker(
        sim,
        VBS_MAX_ATTEMPTS="40",
        VBS_BACKOFF_BASE="0.5",
        VBS_BACKOFF_MAX="5",
        VBS_VISIBILITY_TIMEOUT="20000",
    )
    producer.delete_backups(PROJECT, ids)
    time.sleep(30)
    sim.configure(fault_rate=0.0)
    samples = worker.wait_for_deletions(100, timeout=60)
    assert by_label(samples, DELETIONS, "outcome") == {"accepted": 100}
    assert (
        by_label(samples, "vbs_deleter_retries_total", "reason")["status_503"]
        == sim.stats()["faults_injected"]
    )
    assert sim.stats()["faults_injected"] >= 100
    assert json.loads(cli(redis_url, "dlq", "list", "--json").stdout) == []


def test_start_refuses_a_visibility_timeout_shorter_than_the_longest_unacked_time(redis_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "worker"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "VBS_REDIS_URL": redis_url, "VBS_VISIBILITY_TIMEOUT": "600"},
    )
    assert result.returncode == 2
    assert (
        "VBS_VISIBILITY_TIMEOUT (600s) must exceed" in result.stderr and "VBS_MAX_ATTEMPTS" in result.stderr
    )


def test_a_redelivered_copy_waits_for_the_first_and_finishes_if_it_dies(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    """A task that outlives the visibility timeout is redelivered while its first copy still runs; the copy
    must not skip the backups held by the first worker, or a SIGKILL of that worker would lose them."""
    sim = start_sim("--latency", "0.25")
    ids = sim.seed(120)
    quick = {
        **QUICK_REDELIVERY,
        "VBS_CONCURRENCY": "2",
        "VBS_VISIBILITY_TIMEOUT": "9",
        "VBS_MAX_ATTEMPTS": "1",
        "VBS_READ_TIMEOUT": "1",
    }
    first = start_worker(sim, **quick)
    second = start_worker(sim, **quick)
    producer.delete_backups(PROJECT, ids)  # one task: 120 x 0.25 s / 2 in flight = 15 s > 9 s
    processes.wait_until(
        lambda: (
            first.count("vbs_deleter_http_requests_total") + second.count("vbs_deleter_http_requests_total")
            >= 20
        ),
        30,
        "the run to start",
    )
    time.sleep(12)  # the message has been redelivered to the other worker by now
    busy = (
        first
        if first.count("vbs_deleter_http_requests_total") > second.count("vbs_deleter_http_requests_total")
        else second
    )
    busy.child.stop(signal.SIGKILL)
    processes.wait_until(all_removed(sim), 120, "every backup deleted by the waiting copy")
    stats = sim.stats()
    assert (stats["accepted"], stats["deleted_more_than_once"]) == (120, 0)
