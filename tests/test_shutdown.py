"""Graceful shutdown with a real worker and Redis: past VBS_SHUTDOWN_GRACE, waiting deletions go back."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import redis

from tests.conftest import PROJECT, Sim, Worker
from worker import keys, processes
from worker.producer import Producer
from worker.scrape import by_label

GRACE = 1.0
# Deletions that keep failing half the time sit in long backoffs: without the deadline a warm shutdown
# would wait for their 30 attempts (minutes).
IN_BACKOFF = {
    "VBS_SHUTDOWN_GRACE": str(GRACE),
    "VBS_MAX_ATTEMPTS": "30",
    "VBS_BACKOFF_BASE": "2",
    "VBS_BACKOFF_MAX": "5",
    "VBS_CONNECT_TIMEOUT": "1",
    "VBS_READ_TIMEOUT": "2",
    "VBS_MAX_THROTTLE_WAITS": "0",
    "VBS_RATE_LIMIT": "0",
    "VBS_CONCURRENCY": "8",
    "VBS_HEARTBEAT_INTERVAL": "1",
    "VBS_VISIBILITY_TIMEOUT": "600",
}


def test_sigterm_returns_waiting_deletions_to_the_queue(
    start_sim: Callable[..., Sim],
    start_worker: Callable[..., Worker],
    producer: Producer,
    redis_url: str,
    queue: str,
) -> None:
    sim = start_sim("--fault-rate", "0.5", "--fault-statuses", "503", "--seed", "7")
    ids = sim.seed(100)
    first = start_worker(sim, **IN_BACKOFF)
    for start in range(0, 100, 25):
        producer.send_batch(PROJECT, ids[start : start + 25], request_id="shutdown-test")
    processes.wait_until(lambda: first.count("vbs_deleter_retries_total") >= 20, 60, "deletions in backoff")
    client = redis.Redis.from_url(redis_url)
    assert client.llen(queue) == 0  # all four tasks are running

    stopped = time.monotonic()
    assert first.child.stop(signal.SIGTERM, timeout=60) == 0
    elapsed = time.monotonic() - stopped
    # the grace, then at most one attempt on the wire (3 s), then Celery's and the engine's shutdown
    assert GRACE <= elapsed < GRACE + 3 + 10
    assert "task returned to the queue at shutdown" in first.log()

    accepted_first = sim.stats()["accepted"]
    assert 0 < accepted_first < 100
    # every task message is back in the queue, none is left unacknowledged
    assert (client.llen(queue), client.hlen("unacked")) == (4, 0)
    states = [client.hget(keys.ledger(PROJECT, backup_id), "state") for backup_id in ids]
    # what was claimed and not accepted went back to queued; IDs not yet started have no record
    assert states.count(b"accepted") == accepted_first
    assert states.count(b"queued") + states.count(None) == 100 - accepted_first

    sim.configure(fault_rate=0.0)
    second = start_worker(sim, **IN_BACKOFF)
    second.wait_for_deletions(100, timeout=120)
    stats = sim.stats()
    assert (stats["accepted"], stats["deleted_more_than_once"]) == (100, 0)
    assert stats["statuses"].get("404", 0) == 0  # nothing was sent after it was accepted
    outcomes = by_label(second.metrics(), "vbs_deleter_deletions_total", "outcome")
    # the whole batches came back: what the first worker finished is skipped by the ledger
    assert outcomes == {"accepted": 100 - accepted_first, "duplicate": accepted_first}
    processes.wait_until(lambda: client.llen(queue) == 0, 10, "an empty queue")
