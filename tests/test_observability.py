"""Job follow-up, exemplars, recent jobs, health endpoints, JSON logs, promtool and several processes,
with real worker processes, a private Redis and the simulator."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import PROJECT, Sim, Worker, require_tool
from worker import processes
from worker.producer import Producer
from worker.scrape import by_label, total

DELETIONS = "vbs_deleter_deletions_total"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def fetch(url: str, accept: str = "") -> tuple[int, str, str]:
    """Status, content type and body of a GET (error statuses included)."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def recent_jobs(worker: Worker) -> dict[str, tuple[str, str]]:
    """job_id -> (backup_id, status) from vbs_deleter_recent_job_info."""
    return {
        dict(labels)["job_id"]: (dict(labels)["backup_id"], dict(labels)["status"])
        for (name, labels), _ in worker.metrics().items()
        if name == "vbs_deleter_recent_job_info"
    }


def test_failed_jobs_count_as_failed_deletions_with_their_code(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--job-duration", "0.6", "--job-fail-rate", "1")
    ids = sim.seed(4)
    worker = start_worker(sim, VBS_JOB_POLL_INTERVAL="0.2", VBS_RECENT_JOBS="3")
    producer.delete_backups(PROJECT, ids, request_id="jobs-fail")
    samples = worker.wait_for_deletions(4)
    assert by_label(samples, DELETIONS, "outcome") == {"failed": 4}
    failures = {k[1]: v for k, v in samples.items() if k[0] == "vbs_deleter_deletion_failures_total" and v}
    assert failures == {(("error_code", "VolumeBackup.0101"), ("status", "job")): 4.0}
    assert by_label(samples, "vbs_deleter_jobs_total", "status") == {"fail": 4}
    assert total(samples, "vbs_deleter_job_duration_seconds_count", status="fail") == 4
    jobs = recent_jobs(worker)
    assert len(jobs) == 3 and {status for _, status in jobs.values()} == {"fail"}
    assert {backup for backup, _ in jobs.values()} < set(ids)
    polls = total(samples, "vbs_deleter_http_requests_total", operation="job", status="200")
    assert polls == sim.stats()["requests"]["job"] and polls >= 8  # INIT/RUNNING at least once each


def test_successful_jobs_and_exemplars(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--job-duration", "0.5")
    ids = sim.seed(3)
    worker = start_worker(sim, VBS_JOB_POLL_INTERVAL="0.2")
    producer.delete_backups(PROJECT, [*ids, str(uuid.uuid4())])
    samples = worker.wait_for_deletions(4)
    assert by_label(samples, DELETIONS, "outcome") == {"accepted": 3, "already_gone": 1}
    assert by_label(samples, "vbs_deleter_jobs_total", "status") == {"success": 3}
    jobs = recent_jobs(worker)
    assert sorted(backup for backup, _ in jobs.values()) == sorted(ids)
    assert {status for _, status in jobs.values()} == {"success"}
    status, content_type, text = fetch(worker.child.url + "/metrics", accept=OPENMETRICS)
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    exemplars = [line for line in text.splitlines() if " # {" in line]
    job_lines = [line for line in exemplars if line.startswith("vbs_deleter_http_requests_total{")]
    assert job_lines and all("backup_id=" in line for line in job_lines)
    assert any(f'job_id="{job}"' in line for line in job_lines for job in jobs)
    assert any(line.startswith("vbs_deleter_http_request_duration_seconds_bucket") for line in exemplars)
    status, content_type, text = fetch(worker.child.url + "/metrics")
    assert content_type.startswith("text/plain") and " # {" not in text


def test_job_deadline_fails_the_deletion(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--job-duration", "60")
    ids = sim.seed(1)
    worker = start_worker(sim, VBS_JOB_POLL_INTERVAL="0.2", VBS_JOB_DEADLINE="1")
    producer.delete_backup(PROJECT, ids[0])
    samples = worker.wait_for_deletions(1)
    assert by_label(samples, DELETIONS, "outcome") == {"failed": 1}
    assert by_label(samples, "vbs_deleter_jobs_total", "status") == {"timeout": 1}
    assert by_label(samples, "vbs_deleter_deletion_failures_total", "status") == {"job": 1}
    assert {status for _, status in recent_jobs(worker).values()} == {"timeout"}


@pytest.mark.parametrize("api", ["native-v2", "native-v3"])
def test_native_modes_read_the_backup_until_404(
    api: str, start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--job-duration", "0.5")
    ids = sim.seed(2)
    worker = start_worker(sim, VBS_API=api, VBS_JOB_POLL_INTERVAL="0.2")
    producer.delete_backups(PROJECT, ids)
    samples = worker.wait_for_deletions(2)
    assert by_label(samples, DELETIONS, "outcome") == {"accepted": 2}
    assert by_label(samples, "vbs_deleter_jobs_total", "status") == {"success": 2}
    shows = by_label(samples, "vbs_deleter_http_requests_total", "status")
    assert shows["202"] == 2 and shows["404"] == 2 and shows["200"] >= 2  # "deleting" read at least once
    reads = total(samples, "vbs_deleter_http_requests_total", operation="show")
    assert reads == sim.stats()["requests"]["show"]
    assert recent_jobs(worker) == {}


def test_following_can_be_switched_off(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--job-duration", "30")
    ids = sim.seed(2)
    worker = start_worker(sim, VBS_FOLLOW_JOBS="false")
    producer.delete_backups(PROJECT, ids)
    samples = worker.wait_for_deletions(2)
    assert by_label(samples, DELETIONS, "outcome") == {"accepted": 2}
    assert sim.stats()["requests"]["job"] == 0 and total(samples, "vbs_deleter_jobs_total") == 0
    assert {status for _, status in recent_jobs(worker).values()} == {"accepted"}


def test_health_endpoints_and_backlog(
    sim: Sim, start_worker: Callable[..., Worker], queue: str, tmp_path: Path
) -> None:
    own_redis = processes.start_redis(data_dir=tmp_path)
    try:
        Producer(own_redis.url, queue).delete_backup(PROJECT, str(uuid.uuid4()))  # waits: no worker yet
        worker = start_worker(sim, VBS_REDIS_URL=own_redis.url)
        url = worker.child.url
        processes.wait_until(lambda: fetch(url + "/healthz")[0] == 200, 30, "a healthy worker")
        assert json.loads(fetch(url + "/healthz")[2]) == {"loop": True, "redis": True, "consuming": True}
        assert fetch(url + "/readyz")[:1] == (200,)
        worker.wait_for_deletions(1)
        assert worker.count("vbs_deleter_queue_messages", queue=queue) == 0
        Producer(own_redis.url, "vbs.elsewhere").delete_backup(PROJECT, str(uuid.uuid4()))  # not ours
        assert worker.count("vbs_deleter_queue_messages", queue=queue) == 0
        own_redis.stop()
        status, _, body = fetch(url + "/healthz")
        assert status == 503 and json.loads(body)["redis"] is False
        assert "vbs_deleter_queue_messages" not in fetch(url + "/metrics")[2]  # unknown, not stale
    finally:
        own_redis.stop()


def test_json_logs_carry_the_ids_on_every_deletion_line(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--ghost-rate", "0.5", "--job-duration", "0.3", "--seed", "7")
    ids = sim.seed(6) + sim.seed(backups=[{"undeletable": True}])
    worker = start_worker(sim, VBS_LOG_FORMAT="json", VBS_JOB_POLL_INTERVAL="0.1")
    producer.delete_backups(PROJECT, [*ids, str(uuid.uuid4())], request_id="json-logs")
    worker.wait_for_deletions(8)
    lines = [line for line in worker.log().splitlines() if line.startswith('{"ts"')]
    entries = [json.loads(line) for line in lines]
    about = [
        e
        for e in entries
        if e["logger"] in ("vbs_deleter.engine", "vbs_deleter.jobs") and "authentication" not in e["msg"]
    ]
    assert len(about) >= 8
    for entry in about:
        assert {"backup_id", "job_id", "request_id"} <= set(entry), entry
        assert entry["request_id"] == "json-logs", entry
    confirmed = [e for e in about if e["msg"] == "deletion confirmed"]
    assert len(confirmed) == by_label(worker.metrics(), DELETIONS, "outcome")["accepted"]
    assert all(e["job_id"] and e["backup_id"] in ids for e in confirmed)


def test_promtool_accepts_the_exposition(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    promtool = require_tool("promtool")
    sim = start_sim("--fault-rate", "0.3", "--job-duration", "0.2", "--job-fail-rate", "0.3", "--seed", "3")
    ids = sim.seed(10) + sim.seed(backups=[{"undeletable": True}])
    worker = start_worker(sim, VBS_JOB_POLL_INTERVAL="0.1", VBS_MAX_ATTEMPTS="20", VBS_JOB_DEADLINE="60")
    producer.delete_backups(PROJECT, ids)
    worker.wait_for_deletions(11)
    text = fetch(worker.child.url + "/metrics")[2]
    assert "vbs_deleter_recent_job_info{" in text and "vbs_deleter_queue_messages{" in text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_counters_add_up_exactly_over_several_processes(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--latency", "0.05", "--job-duration", "0.1")
    ids = sim.seed(100)
    workers = [
        start_worker(sim, VBS_CONCURRENCY="4", VBS_JOB_POLL_INTERVAL="0.1", VBS_LOG_LEVEL="WARNING")
        for _ in range(3)
    ]
    for backup_id in ids:
        producer.delete_backup(PROJECT, backup_id)

    def finished() -> float:
        return sum(w.count(DELETIONS) for w in workers)

    processes.wait_until(lambda: finished() >= 100, 120, "100 deletions over 3 workers")
    per_worker = [w.count(DELETIONS, outcome="accepted") for w in workers]
    assert sum(per_worker) == 100 and sum(1 for n in per_worker if n) >= 2, per_worker
    assert sum(w.count("vbs_deleter_jobs_total", status="success") for w in workers) == 100
    assert sum(w.count("vbs_deleter_tasks_total") for w in workers) == 100
    assert sim.stats()["accepted"] == 100 and sim.stats()["deleted_more_than_once"] == 0
    ports = {w.child.url for w in workers}
    assert len(ports) == 3  # each process serves its own registry on its own port


def test_task_is_acknowledged_before_its_jobs_end_and_follow_ups_are_capped(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer, redis_url: str
) -> None:
    """Follow-ups run after the ack: the ledger says pending, then success. At most VBS_MAX_FOLLOWING
    follow-ups run at once; the others are parked in Redis and adopted as slots free, and no deletion
    waits for a slot."""
    import time

    import redis

    from worker import keys

    sim = start_sim("--job-duration", "1.5")
    ids = sim.seed(6)
    worker = start_worker(
        sim, VBS_JOB_POLL_INTERVAL="0.3", VBS_MAX_FOLLOWING="2", VBS_HEARTBEAT_INTERVAL="0.3"
    )
    client = redis.Redis.from_url(redis_url)
    producer.delete_backups(PROJECT, ids)
    processes.wait_until(lambda: sim.stats()["accepted"] == 6, 10, "every delete accepted")
    assert worker.count(DELETIONS) == 0  # before any job ended
    processes.wait_until(lambda: worker.count("vbs_deleter_tasks_total") == 1, 10, "the task acked")
    peak = 0.0
    deadline = time.monotonic() + 60
    while worker.count(DELETIONS) < 6 and time.monotonic() < deadline:
        peak = max(peak, worker.count("vbs_deleter_follow_ups_in_progress"))
        time.sleep(0.05)
    samples = worker.metrics()
    assert by_label(samples, DELETIONS, "outcome") == {"accepted": 6}
    assert by_label(samples, "vbs_deleter_jobs_total", "status") == {"success": 6}
    assert peak == 2  # the cap was reached and never passed
    assert {client.hget(keys.ledger(PROJECT, b), "job_status") for b in ids} == {b"success"}
    assert client.zcard(keys.FOLLOWING) == 0
    assert sim.stats()["requests"]["delete"] == 6


def test_follow_ups_of_a_killed_worker_are_taken_over(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer, redis_url: str
) -> None:
    """SIGKILL while jobs are followed (tasks acknowledged already): another worker adopts the pending
    follow-ups once the dead one's heartbeat expires, records their end, and sends nothing again."""
    import signal

    import redis

    from worker import keys

    sim = start_sim("--job-duration", "4", "--job-fail-rate", "0")
    ids = sim.seed(3)
    fast = {"VBS_HEARTBEAT_INTERVAL": "0.5", "VBS_JOB_POLL_INTERVAL": "0.5"}
    first = start_worker(sim, **fast)
    client = redis.Redis.from_url(redis_url)
    producer.delete_backups(PROJECT, ids)
    processes.wait_until(lambda: first.count("vbs_deleter_tasks_total") == 1, 20, "the task acked")
    assert {client.hget(keys.ledger(PROJECT, b), "job_status") for b in ids} == {b"pending"}
    assert client.zcard(keys.FOLLOWING) == 3
    first.child.process.send_signal(signal.SIGKILL)
    first.child.process.wait(10)
    second = start_worker(sim, **fast)
    samples = second.wait_for_deletions(3, timeout=30)
    assert by_label(samples, DELETIONS, "outcome") == {"accepted": 3}
    assert by_label(samples, "vbs_deleter_jobs_total", "status") == {"success": 3}
    assert {client.hget(keys.ledger(PROJECT, b), "job_status") for b in ids} == {b"success"}
    assert client.zcard(keys.FOLLOWING) == 0
    stats = sim.stats()
    assert (stats["requests"]["delete"], stats["accepted"]) == (3, 3)  # nothing sent again
