"""Shared machinery of the benchmarks: a private Redis, the simulator, worker processes, measurements.

Everything runs on loopback; each scenario gets a fresh Redis and simulator, so runs do not interfere.
Rates come from the simulator's own clock (first to last API request it saw), CPU and memory from
/proc of the worker processes.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from worker import processes
from worker.producer import Producer

PROJECT = "be" * 16
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid``, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Stack:
    """A running Redis + simulator (+ workers added by the scenario)."""

    redis_url: str
    sim_url: str
    queue: str
    workdir: Path
    stack: contextlib.ExitStack
    workers: list[processes.Child] = field(default_factory=list)

    def seed(self, count: int) -> list[str]:
        ids: list[str] = []
        while len(ids) < count:  # seed in chunks: one request body stays small
            chunk = min(20_000, count - len(ids))
            ids += processes.http_json(self.sim_url + "/_sim/seed", {"project_id": PROJECT, "count": chunk})[
                "ids"
            ]
        return ids

    def stats(self) -> dict[str, Any]:
        return dict(processes.http_json(self.sim_url + "/_sim/stats"))

    def start_worker(self, **env: str) -> processes.Child:
        base = {
            "VBS_REDIS_URL": self.redis_url,
            "VBS_QUEUE": self.queue,
            "VBS_ENDPOINT": self.sim_url,
            "VBS_LOG_LEVEL": "WARNING",
            "VBS_VISIBILITY_TIMEOUT": "1000000",
            "VBS_RATE_LIMIT": "0",
        }
        child = processes.start_worker(
            {**base, **env}, log_path=self.workdir / f"worker{len(self.workers)}.log"
        )
        self.stack.enter_context(processes.running(child))
        self.workers.append(child)
        return child

    def enqueue(self, ids: list[str], batch: int) -> float:
        """Enqueue ``ids`` in tasks of ``batch`` IDs (1 = single-backup tasks); returns seconds taken."""
        started = time.perf_counter()
        with Producer(self.redis_url, self.queue) as producer:
            if batch == 1:
                for backup_id in ids:
                    producer.delete_backup(PROJECT, backup_id)
            else:
                producer.delete_backups(PROJECT, ids, batch_size=batch)
        return time.perf_counter() - started

    def wait_removed(self, total: int, timeout: float) -> None:
        processes.wait_until(lambda: self.stats()["removed"] >= total, timeout, f"{total} deletions", 0.2)

    def redis_memory(self) -> int:
        return int(redis.Redis.from_url(self.redis_url).info("memory")["used_memory"])


@contextlib.contextmanager
def stack(sim_options: list[str]) -> Iterator[Stack]:
    """A fresh private Redis and simulator for one run."""
    workdir = Path(tempfile.mkdtemp(prefix="vbs-bench-"))
    with contextlib.ExitStack() as exits:
        redis_child = exits.enter_context(processes.running(processes.start_redis(data_dir=workdir)))
        sim = exits.enter_context(
            processes.running(processes.start_simulator(sim_options, log_path=workdir / "sim.log"))
        )
        yield Stack(redis_child.url, sim.url, f"bench.{uuid.uuid4().hex[:6]}", workdir, exits)


class Sampler:
    """Samples a value every ``interval`` seconds in a thread while a block runs."""

    def __init__(self, read: Callable[[], float], interval: float = 0.5) -> None:
        self._read, self._interval = read, interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.samples.append((time.monotonic(), self._read()))
            self._stop.wait(self._interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per-key median over runs (keys of the first run)."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def span_rate(stats: dict[str, Any], count: int) -> tuple[float, float]:
    """(seconds from the first to the last API request, deletions per second over that span)."""
    span = stats["request_times"]["last"] - stats["request_times"]["first"]
    return span, count / span if span > 0 else float("inf")
