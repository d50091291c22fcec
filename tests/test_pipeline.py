"""End to end: a real Celery worker process, a real Redis and the simulator over HTTP."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import redis
from celery import Celery
from kombu import Connection, Exchange
from kombu import Producer as KombuProducer
from kombu import Queue as KombuQueue

from tests.conftest import PROJECT, Sim, Worker
from worker.processes import free_port, wait_until
from worker.producer import Producer
from worker.scrape import by_label, total

DELETIONS = "vbs_deleter_deletions_total"


@pytest.fixture
def raw_app(redis_url: str) -> Iterator[Celery]:
    """A bare Celery app for sending tasks that break the contract."""
    app = Celery("raw", broker=redis_url, set_as_current=False)
    app.conf.update(task_serializer="json")
    yield app
    app.close()


def outcomes(worker: Worker) -> dict[str, float]:
    return by_label(worker.metrics(), DELETIONS, "outcome")


def test_each_outcome_in_one_batch(sim: Sim, start_worker: Callable[..., Worker], producer: Producer) -> None:
    ok = sim.seed(3)
    blocked = sim.seed(backups=[{"undeletable": True}])
    missing = str(uuid.uuid4())
    worker = start_worker(sim)
    producer.delete_backups(PROJECT, [*ok, *blocked, missing], request_id="batch-1")
    samples = worker.wait_for_deletions(5)
    assert by_label(samples, DELETIONS, "outcome") == {"accepted": 3, "already_gone": 1, "failed": 1}
    failures = {k: v for k, v in samples.items() if k[0] == "vbs_deleter_deletion_failures_total" and v}
    assert failures == {
        ("vbs_deleter_deletion_failures_total", (("error_code", "VolumeBackup.0113"), ("status", "400"))): 1.0
    }
    stats = sim.stats()
    assert stats["accepted"] == 3 and stats["max_accepted_per_backup"] == 1
    assert "request_id=batch-1" in worker.log() and blocked[0] in worker.log()


@pytest.mark.parametrize("status", [408, 503, 504])
def test_retried_statuses_then_success(
    status: int, start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--fault-rate", "1", "--fault-statuses", str(status))
    backup = sim.seed(1)[0]
    worker = start_worker(
        sim,
        VBS_MAX_ATTEMPTS="50",
        VBS_BACKOFF_BASE="0.1",
        VBS_BACKOFF_MAX="0.2",
        VBS_VISIBILITY_TIMEOUT="9000",
    )
    producer.delete_backup(PROJECT, backup)
    reason = f"status_{status}"
    wait_until(lambda: worker.count("vbs_deleter_retries_total", reason=reason) >= 2, 30, "two retries")
    sim.configure(fault_rate=0.0)
    worker.wait_for_deletions(1)
    assert outcomes(worker) == {"accepted": 1}
    assert sim.stats()["accepted"] == 1


def test_retries_exhausted_fail_with_status(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--fault-rate", "1", "--fault-statuses", "503")
    backup = sim.seed(1)[0]
    worker = start_worker(sim, VBS_MAX_ATTEMPTS="3")
    producer.delete_backup(PROJECT, backup)
    samples = worker.wait_for_deletions(1)
    assert by_label(samples, DELETIONS, "outcome") == {"failed": 1}
    assert by_label(samples, "vbs_deleter_retries_total", "reason") == {"status_503": 2}
    assert by_label(samples, "vbs_deleter_deletion_failures_total", "status") == {"503": 1}
    assert sim.stats()["requests"]["delete"] == 3


def test_ghost_504_is_already_gone_on_retry(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--ghost-rate", "1")
    ids = sim.seed(5)
    worker = start_worker(sim)
    producer.delete_backups(PROJECT, ids)
    samples = worker.wait_for_deletions(5)
    assert by_label(samples, DELETIONS, "outcome") == {"already_gone": 5}
    assert by_label(samples, "vbs_deleter_retries_total", "reason") == {"status_504": 5}
    stats = sim.stats()
    assert (stats["accepted"], stats["deleted_more_than_once"], stats["ghosts_injected"]) == (5, 0, 5)


@pytest.mark.parametrize("rate_limit", ["40", "0"])  # with the shared bucket, and with it turned off
def test_throttled_requests_wait_and_succeed(
    rate_limit: str, start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--rate-limit", "20", "--rate-burst", "5", "--retry-after", "1")
    ids = sim.seed(20)
    worker = start_worker(sim, VBS_RATE_LIMIT=rate_limit, VBS_FOLLOW_JOBS="false")
    started = time.monotonic()
    producer.delete_backups(PROJECT, ids)
    samples = worker.wait_for_deletions(20)
    assert by_label(samples, DELETIONS, "outcome") == {"accepted": 20}
    throttled = by_label(samples, "vbs_deleter_retries_total", "reason")["throttled"]
    assert throttled == total(samples, "vbs_deleter_http_requests_total", operation="delete", status="429")
    assert total(samples, "vbs_deleter_http_requests_total", status="429") == sim.stats()["statuses"]["429"]
    assert throttled >= 1 and time.monotonic() - started >= 1.0  # Retry-After: 1 was waited out


def test_timeouts_are_retried(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--latency", "1.0")
    backup = sim.seed(1)[0]
    worker = start_worker(sim, VBS_READ_TIMEOUT="0.2", VBS_MAX_ATTEMPTS="50", VBS_VISIBILITY_TIMEOUT="9000")
    producer.delete_backup(PROJECT, backup)
    wait_until(
        lambda: worker.count("vbs_deleter_retries_total", reason="timeout") >= 1, 20, "a timeout retry"
    )
    sim.configure(latency=0.0)
    worker.wait_for_deletions(1)
    # the timed-out attempt may have deleted the backup before its answer was lost: accepted or gone
    assert sum(outcomes(worker).values()) == 1 and "failed" not in outcomes(worker)
    assert sim.stats()["deleted_more_than_once"] == 0


def test_connection_refused_is_retried_then_fails(
    start_worker: Callable[..., Worker], producer: Producer
) -> None:
    worker = start_worker(None, VBS_ENDPOINT=f"http://127.0.0.1:{free_port()}", VBS_MAX_ATTEMPTS="3")
    producer.delete_backup(PROJECT, str(uuid.uuid4()))
    samples = worker.wait_for_deletions(1)
    assert by_label(samples, DELETIONS, "outcome") == {"failed": 1}
    assert by_label(samples, "vbs_deleter_retries_total", "reason") == {"connection": 2}
    assert by_label(samples, "vbs_deleter_deletion_failures_total", "status") == {"none": 1}


@pytest.mark.parametrize("api", ["native-v2", "native-v3"])
def test_native_modes(api: str, sim: Sim, start_worker: Callable[..., Worker], producer: Producer) -> None:
    ids = sim.seed(2)
    worker = start_worker(sim, VBS_API=api)
    producer.delete_backups(PROJECT, [*ids, str(uuid.uuid4())])
    samples = worker.wait_for_deletions(3)
    assert by_label(samples, DELETIONS, "outcome") == {"accepted": 2, "already_gone": 1}
    deletes = {
        dict(labels)["status"]: value
        for (name, labels), value in samples.items()
        if name == "vbs_deleter_http_requests_total" and ("operation", "delete") in labels
    }
    assert deletes == {"202": 2, "404": 1}


def test_token_is_sent(
    start_sim: Callable[..., Sim], start_worker: Callable[..., Worker], producer: Producer
) -> None:
    sim = start_sim("--token", "tok-123")
    ids = sim.seed(2)
    good = start_worker(sim, VBS_AUTH_TOKEN="tok-123")
    producer.delete_backup(PROJECT, ids[0])
    assert by_label(good.wait_for_deletions(1), DELETIONS, "outcome") == {"accepted": 1}
    good.child.stop()
    bad = start_worker(sim, VBS_AUTH_TOKEN="wrong")
    producer.delete_backup(PROJECT, ids[1])
    samples = bad.wait_for_deletions(1)
    assert by_label(samples, "vbs_deleter_deletion_failures_total", "error_code") == {"APIG.0301": 1}
    assert "wrong" not in bad.log() and "tok-123" not in bad.log()


BAD_TASKS: list[tuple[str, tuple[Any, ...], dict[str, Any], str]] = [
    ("vbs.delete_backup", (), {"project_id": PROJECT}, "missing_kwargs"),
    (
        "vbs.delete_backup",
        (),
        {"project_id": PROJECT, "backup_id": str(uuid.uuid4()), "x": 1},
        "extra_kwargs",
    ),
    ("vbs.delete_backup", (), {"project_id": PROJECT, "backup_id": "../../etc"}, "bad_format"),
    ("vbs.delete_backup", (), {"project_id": 7, "backup_id": str(uuid.uuid4())}, "wrong_type"),
    ("vbs.delete_backup", (PROJECT, str(uuid.uuid4())), {}, "positional_args"),
    ("vbs.delete_backups", (), {"project_id": PROJECT, "backup_ids": []}, "empty_value"),
    (
        "vbs.delete_backups",
        (),
        {"project_id": PROJECT, "backup_ids": [str(uuid.uuid4())] * 1001},
        "too_many_ids",
    ),
]


def test_bad_tasks_are_rejected_without_http_and_the_worker_goes_on(
    sim: Sim,
    start_worker: Callable[..., Worker],
    producer: Producer,
    raw_app: Celery,
    queue: str,
    redis_url: str,
) -> None:
    worker = start_worker(sim)
    for name, args, kwargs, _ in BAD_TASKS:
        raw_app.send_task(name, args=args, kwargs=kwargs, queue=queue)
    with Connection(redis_url) as conn:  # a pickled task: must never be executed
        KombuProducer(conn).publish(
            {"evil": True},
            routing_key=queue,
            exchange=Exchange(queue),
            serializer="pickle",
            headers={"task": "vbs.delete_backup", "id": str(uuid.uuid4()), "lang": "py"},
        )
        KombuProducer(conn).publish(  # JSON that does not parse
            b"[[], {not json",
            routing_key=queue,
            exchange=Exchange(queue),
            content_type="application/json",
            content_encoding="utf-8",
            headers={"task": "vbs.delete_backup", "id": str(uuid.uuid4()), "lang": "py"},
        )
    raw_app.send_task("vbs.drop_all_backups", kwargs={"project_id": PROJECT}, queue=queue)
    good = sim.seed(1)
    producer.delete_backup(PROJECT, good[0])
    samples = worker.wait_for_deletions(1)
    wait_until(
        lambda: worker.count("vbs_deleter_rejected_tasks_total") >= len(BAD_TASKS) + 3,
        20,
        "all rejections counted",
    )
    expected: dict[str, float] = {"disallowed_content": 1, "undecodable": 1, "unknown_task": 1}
    for *_, reason in BAD_TASKS:
        expected[reason] = expected.get(reason, 0) + 1
    assert by_label(worker.metrics(), "vbs_deleter_rejected_tasks_total", "reason") == expected
    assert by_label(samples, DELETIONS, "outcome") == {"accepted": 1}
    assert sim.stats()["requests"]["delete"] == 1
    assert worker.child.process.poll() is None


def test_demo_invariant() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", "--count", "300"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deleted more than once  0" in result.stdout
    assert "deletable left behind   0" in result.stdout


def test_kombu_producer_example(
    sim: Sim, start_worker: Callable[..., Worker], redis_url: str, queue: str
) -> None:
    """The README's producer that does not import the worker package, sending before any worker exists."""
    ids = sim.seed(3)
    subprocess.run(
        [sys.executable, "deploy/examples/kombu_producer.py", redis_url, queue, PROJECT, *ids],
        check=True,
        timeout=30,
    )
    worker = start_worker(sim)
    assert by_label(worker.wait_for_deletions(3), DELETIONS, "outcome") == {"accepted": 3}
    assert "request_id=kombu-example-" in worker.log()


def test_plain_celery_command_runs_the_worker(
    sim: Sim, redis_url: str, queue: str, producer: Producer, tmp_path: Any
) -> None:
    """`celery -A worker worker` uses the threads pool and the same engine."""
    port = free_port()
    env = {
        **os.environ,
        "VBS_REDIS_URL": redis_url,
        "VBS_ENDPOINT": sim.url,
        "VBS_METRICS_PORT": str(port),
        "VBS_METRICS_HOST": "127.0.0.1",
    }
    log = (tmp_path / "celery.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "-Q", queue, "--without-gossip"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        worker = Worker(
            __import__("worker.processes", fromlist=["Child"]).Child(process, f"http://127.0.0.1:{port}")
        )
        ids = sim.seed(2)
        producer.delete_backups(PROJECT, ids)
        wait_until(lambda: worker.count(DELETIONS) >= 2, 60, "two deletions")
        assert by_label(worker.metrics(), DELETIONS, "outcome") == {"accepted": 2}
    finally:
        process.terminate()
        process.wait(30)


def test_bad_setting_stops_the_worker_at_start(redis_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "worker"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "VBS_REDIS_URL": redis_url, "VBS_CONCURENCY": "8", "VBS_MAX_ATTEMPTS": "many"},
    )
    assert result.returncode == 2
    assert "VBS_CONCURENCY" in result.stderr


POISON: list[tuple[object, dict[str, object]]] = [
    ({"project_id": PROJECT, "backup_id": "70a599e0-31e7-49b7-b260-868f441e862b"}, {}),
    ([[], {"project_id": PROJECT}], {}),
    ([[], {}, {}, 4], {}),
    (None, {}),
    (12345, {}),
    ("hello", {}),
    ([[], None, {}], {}),
    ([[], {}, "notadict"], {}),
    ([[], {}, {"callbacks": "x", "errbacks": 5}], {}),
    ([[], {"project_id": PROJECT}, {}], {"timelimit": "garbage"}),
    ([[], {"project_id": PROJECT}, {}], {"id": None}),
    ([[], {"project_id": PROJECT}, {}], {"task": "celery.chord_unlock"}),
]


def test_poison_messages_never_stop_or_block_the_worker(
    sim: Sim, start_worker: Callable[..., Worker], producer: Producer, redis_url: str, queue: str
) -> None:
    """Bodies and headers Celery would choke on are refused at the door, while valid work goes on."""
    with Connection(redis_url) as conn:
        publish = KombuProducer(conn).publish
        for body, header_changes in POISON:
            headers = {"task": "vbs.delete_backup", "id": str(uuid.uuid4()), "lang": "py", **header_changes}
            publish(
                body,
                routing_key=queue,
                exchange=Exchange(queue),
                serializer="json",
                headers=headers,
                declare=[KombuQueue(queue, Exchange(queue), routing_key=queue)],
            )
    worker = start_worker(sim, VBS_CONCURRENCY="2")
    ids = sim.seed(3)
    producer.delete_backups(PROJECT, ids)
    samples = worker.wait_for_deletions(3)
    assert by_label(samples, DELETIONS, "outcome") == {"accepted": 3}
    wait_until(
        lambda: worker.count("vbs_deleter_rejected_tasks_total") == len(POISON), 20, "every poison counted"
    )
    assert by_label(worker.metrics(), "vbs_deleter_rejected_tasks_total", "reason") == {
        "malformed_message": len(POISON) - 1,
        "unknown_task": 1,
    }
    assert worker.child.process.poll() is None
    assert redis.Redis.from_url(redis_url).llen(queue) == 0
    assert redis.Redis.from_url(redis_url).hlen("unacked") == 0  # every poison message was acknowledged
    assert sim.stats()["requests"]["delete"] == 3


class _Redirector(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[str, str | None]]] = []

    def do_POST(self) -> None:
        self.seen.append((self.path, self.headers.get("X-Auth-Token")))
        self.send_response(307)
        self.send_header("Location", "/steal")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST

    def log_message(self, *args: object) -> None:
        pass


def test_redirects_are_not_followed(start_worker: Callable[..., Worker], producer: Producer) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        worker = start_worker(
            None, VBS_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", VBS_AUTH_TOKEN="tok-redirect"
        )
        producer.delete_backup(PROJECT, "70a599e0-31e7-49b7-b260-868f441e862b")
        samples = worker.wait_for_deletions(1)
    finally:
        server.shutdown()
    assert by_label(samples, DELETIONS, "outcome") == {"failed": 1}
    assert by_label(samples, "vbs_deleter_deletion_failures_total", "status") == {"307": 1}
    assert [path for path, _ in _Redirector.seen] == [
        f"/v2/{PROJECT}/cloudbackups/70a599e0-31e7-49b7-b260-868f441e862b"
    ]


def test_gateway_404_is_a_failure_not_already_gone(
    sim: Sim, start_worker: Callable[..., Worker], producer: Producer
) -> None:
    ids = sim.seed(2)
    worker = start_worker(sim, VBS_ENDPOINT=sim.url + "/typo")
    producer.delete_backups(PROJECT, ids)
    samples = worker.wait_for_deletions(2)
    assert by_label(samples, DELETIONS, "outcome") == {"failed": 2}
    assert by_label(samples, "vbs_deleter_deletion_failures_total", "error_code") == {"APIGW.0101": 2}
    assert sim.stats()["remaining"][PROJECT] == 2


def test_metrics_port_taken_stops_the_worker(redis_url: str, queue: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "worker.cli", "worker"],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **os.environ,
                "VBS_REDIS_URL": redis_url,
                "VBS_QUEUE": queue,
                "VBS_METRICS_HOST": "127.0.0.1",
                "VBS_METRICS_PORT": str(port),
            },
        )
    assert result.returncode != 0
    assert f"cannot serve metrics on 127.0.0.1:{port} (VBS_METRICS_HOST, VBS_METRICS_PORT)" in result.stderr


def _envelope(queue: str, **changes: object) -> str:
    """A kombu Redis queue item for a valid vbs.delete_backup message, with ``changes`` applied."""
    import base64
    import json

    body = json.dumps([[], {"project_id": PROJECT, "backup_id": str(uuid.uuid4())}, {}]).encode()
    item: dict[str, object] = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"task": "vbs.delete_backup", "id": str(uuid.uuid4()), "lang": "py"},
        "properties": {
            "delivery_tag": str(uuid.uuid4()),
            "body_encoding": "base64",
            "priority": 0,
            "delivery_info": {"exchange": queue, "routing_key": queue},
        },
    }
    item.update(changes)
    return json.dumps(item)


@pytest.mark.parametrize("queued_first", [False, True], ids=["one_by_one", "reserved_in_bulk"])
def test_unreadable_queue_items_never_stop_the_worker(
    sim: Sim,
    start_worker: Callable[..., Worker],
    producer: Producer,
    redis_url: str,
    queue: str,
    queued_first: bool,
) -> None:
    """Items kombu itself cannot read (pushed straight into the list) are counted and dead-lettered, and
    none stays unacknowledged: also when the worker finds them queued and takes them in bulk (the
    reserve script records readable envelopes as unacknowledged before Python looks at them)."""
    client = redis.Redis.from_url(redis_url)
    worker = None if queued_first else start_worker(sim)

    def headers(**extra: object) -> dict[str, object]:
        return {"task": "vbs.delete_backup", "id": str(uuid.uuid4()), "lang": "py", **extra}

    items = [
        "this is not json at all",
        "42",
        "[1, 2, 3]",
        "null",
        _envelope(queue, properties=[1, 2]),
        _envelope(queue, headers=[1, 2]),
        _envelope(queue, properties={"body_encoding": "base64"}),
        _envelope(queue, body="%%% not base64 %%%"),
        _envelope(queue, headers=headers(eta="not-a-date")),
        _envelope(queue, headers=headers(expires=12345)),
        _envelope(queue, headers=headers(compression="application/x-gzip")),
    ]
    for item in items:
        client.lpush(queue, item)
    worker = worker or start_worker(sim)
    wait_until(
        lambda: worker.count("vbs_deleter_rejected_tasks_total") == len(items), 30, "every item refused"
    )
    ids = sim.seed(2)
    producer.delete_backups(PROJECT, ids)
    assert by_label(worker.wait_for_deletions(2), DELETIONS, "outcome") == {"accepted": 2}
    assert worker.child.process.poll() is None
    letters = subprocess.run(
        [sys.executable, "-m", "worker.cli", "dlq", "list", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "VBS_REDIS_URL": redis_url},
    )
    assert len(json.loads(letters.stdout)) == len(items)
    assert sim.stats()["requests"]["delete"] == 2
    assert (client.llen(queue), client.hlen("unacked"), client.zcard("unacked_index")) == (0, 0, 0)


def test_eta_is_honoured_and_an_expired_task_refused(
    sim: Sim, start_worker: Callable[..., Worker], producer: Producer, queue: str
) -> None:
    """A countdown delays the task (it waits in the engine); a task past its expiry, or whose eta lies
    beyond what the visibility timeout allows, is refused."""
    from datetime import UTC, datetime, timedelta

    ids = sim.seed(2)
    worker = start_worker(sim)
    sent = time.time()
    producer._app.send_task(
        "vbs.delete_backup", kwargs={"project_id": PROJECT, "backup_id": ids[0]}, queue=queue, countdown=2
    )
    producer._app.send_task(
        "vbs.delete_backup",
        kwargs={"project_id": PROJECT, "backup_id": ids[1]},
        queue=queue,
        expires=datetime.now(UTC) - timedelta(seconds=1),
    )
    producer._app.send_task(  # expires while it waits for its eta
        "vbs.delete_backup",
        kwargs={"project_id": PROJECT, "backup_id": ids[1]},
        queue=queue,
        countdown=2,
        expires=datetime.now(UTC) + timedelta(seconds=1),
    )
    producer._app.send_task(  # Redis would redeliver it long before then
        "vbs.delete_backup", kwargs={"project_id": PROJECT, "backup_id": ids[1]}, queue=queue, countdown=10**6
    )
    wait_until(lambda: worker.count("vbs_deleter_rejected_tasks_total") == 2, 20, "two refused at once")
    assert sim.stats()["requests"]["delete"] == 0  # the other waits for its eta
    worker.wait_for_deletions(1)
    assert time.time() - sent >= 2
    wait_until(lambda: worker.count("vbs_deleter_rejected_tasks_total") == 3, 20, "three tasks refused")
    refused = by_label(worker.metrics(), "vbs_deleter_rejected_tasks_total", "reason")
    assert refused == {"expired": 2, "eta_too_far": 1}
    assert sim.stats()["requests"]["delete"] == 1
