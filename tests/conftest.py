"""Fixtures that run the real pieces: a private Redis, the simulator and worker processes on loopback."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from worker import processes
from worker.producer import Producer
from worker.scrape import Samples, scrape, total

PROJECT = "0123456789abcdef0123456789abcdef"


def require_tool(name: str) -> str:
    """Path of an installed program; skips the test when it is missing, except in CI (CI=true) where
    .ci/run must have installed it, so there it fails."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed (Debian: apt-get install prometheus)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; .ci/run must install it")
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[processes.Child]:
    """A private redis-server for the whole session, so tests may flush it."""
    child = processes.start_redis(data_dir=tmp_path_factory.mktemp("redis"))
    yield child
    child.stop()


@pytest.fixture
def redis_url(redis_server: processes.Child) -> str:
    """The private Redis, emptied before the test."""
    redis.Redis.from_url(redis_server.url).flushdb()
    return redis_server.url


class Sim:
    """A running simulator and its admin routes."""

    def __init__(self, child: processes.Child) -> None:
        self.child = child
        self.url = child.url

    def seed(
        self,
        count: int = 0,
        backups: list[dict[str, Any]] | None = None,
        project: str = PROJECT,
        **fields: Any,
    ) -> list[str]:
        """Seed ``backups`` specs, or ``count`` backups sharing ``fields`` (age_days, status, ...)."""
        body: dict[str, Any] = {"project_id": project}
        body.update({"backups": backups} if backups is not None else {"count": count, **fields})
        return list(processes.http_json(self.url + "/_sim/seed", body)["ids"])

    def stats(self, detail: bool = False) -> dict[str, Any]:
        return dict(processes.http_json(self.url + "/_sim/stats" + ("?detail=1" if detail else "")))

    def configure(self, **changes: Any) -> dict[str, Any]:
        return dict(processes.http_json(self.url + "/_sim/config", changes))

    def auth(self) -> dict[str, Any]:
        """IAM and gateway auth counters and the IAM tokens issued (GET /_sim/auth)."""
        return dict(processes.http_json(self.url + "/_sim/auth"))

    def revoke(self, project: str | None = None) -> int:
        """Revoke the live IAM tokens (of ``project``); returns how many."""
        body = {} if project is None else {"project_id": project}
        return int(processes.http_json(self.url + "/_sim/iam/revoke", body)["revoked"])


@pytest.fixture
def start_sim(tmp_path: Path) -> Iterator[Callable[..., Sim]]:
    """Factory: ``start_sim("--fault-rate", "0.5")`` starts a simulator, stopped after the test."""
    children: list[processes.Child] = []

    def start(*options: str) -> Sim:
        child = processes.start_simulator(list(options), log_path=tmp_path / f"sim{len(children)}.log")
        children.append(child)
        return Sim(child)

    yield start
    for child in children:
        child.stop()


@pytest.fixture
def sim(start_sim: Callable[..., Sim]) -> Sim:
    """A well-behaved simulator."""
    return start_sim()


@pytest.fixture
def queue() -> str:
    """A queue name of this test's own."""
    return f"vbs.test.{uuid.uuid4().hex[:8]}"


class Worker:
    """A running ``vbs-deleter worker`` process."""

    def __init__(self, child: processes.Child) -> None:
        self.child = child

    def metrics(self) -> Samples:
        return scrape(self.child.url + "/metrics")

    def count(self, name: str, **labels: str) -> float:
        return total(self.metrics(), name, **labels)

    def wait_for_deletions(self, n: int, timeout: float = 60.0) -> Samples:
        """Wait until ``n`` deletions have finished (any outcome); returns the metrics then."""
        processes.wait_until(
            lambda: self.count("vbs_deleter_deletions_total") >= n, timeout, f"{n} finished deletions"
        )
        return self.metrics()

    def log(self) -> str:
        return self.child.log_text()


@pytest.fixture
def start_worker(redis_url: str, queue: str, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Factory: ``start_worker(sim, VBS_MAX_ATTEMPTS="3")`` starts a worker on this test's queue."""
    children: list[processes.Child] = []

    def start(sim: Sim | None = None, **env: str) -> Worker:
        base = {
            "VBS_REDIS_URL": redis_url,
            "VBS_QUEUE": queue,
            "VBS_BACKOFF_BASE": "0.05",
            "VBS_BACKOFF_MAX": "0.5",
        }
        if sim is not None:
            base["VBS_ENDPOINT"] = sim.url
        log_path = tmp_path / f"worker{len(children)}.log"
        child = processes.start_worker({**base, **env}, log_path=log_path)
        children.append(child)
        return Worker(child)

    yield start
    for child in children:
        child.stop()


@pytest.fixture
def producer(redis_url: str, queue: str) -> Iterator[Producer]:
    """A producer on this test's queue."""
    made = Producer(redis_url, queue)
    yield made
    made.close()
