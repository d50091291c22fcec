"""``make bench``: every scenario against the simulator on loopback; a table, and JSON in bench/results/.

Each figure is the median of ``--runs`` runs; ratios are computed within the same run. Scenarios:
overhead (batch and single tasks), latency hiding (vs the baseline), rate fidelity, memory, submit, CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

from bench.harness import PROJECT, Sampler, cpu_seconds, median_of, rss_bytes, span_rate, stack
from worker import processes
from worker.producer import Producer

RESULTS = Path(__file__).parent / "results"
Scenario = Callable[[], dict[str, float]]


def throughput(
    deletions: int, batch: int, latency: float, concurrency: int, follow: bool = False
) -> dict[str, float]:
    """One worker process; the queue is filled first, then the worker drains it.

    ``follow``: job follow-up on (one more GET per deletion, a first poll after VBS_JOB_POLL_INTERVAL).
    """
    with stack(["--latency", str(latency)]) as s:
        ids = s.seed(deletions)
        s.enqueue(ids, batch)
        worker = s.start_worker(VBS_CONCURRENCY=str(concurrency), VBS_FOLLOW_JOBS=str(follow).lower())
        cpu_before = cpu_seconds(worker.process.pid)
        s.wait_removed(deletions, timeout=deletions / 50 + 120)
        cpu = cpu_seconds(worker.process.pid) - cpu_before
        span, rate = span_rate(s.stats(), deletions)
    return {"deletions_per_s": rate, "seconds": span, "cpu_s_per_deletion": cpu / deletions}


def baseline(deletions: int, latency: float) -> dict[str, float]:
    """The naive Celery prefork + requests worker (default concurrency: one process per core)."""
    with stack(["--latency", str(latency)]) as s:
        ids = s.seed(deletions)
        with Producer(s.redis_url, s.queue) as producer:
            app = producer._app  # the baseline has its own task name; reuse the producer's connection
            for backup_id in ids:
                app.send_task("baseline.delete", args=[PROJECT, backup_id], queue=s.queue)
        env = {
            **os.environ,
            "BASELINE_REDIS_URL": s.redis_url,
            "BASELINE_ENDPOINT": s.sim_url,
            "BASELINE_QUEUE": s.queue,
        }
        log = (s.workdir / "baseline.log").open("wb")
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "bench.baseline",
                "worker",
                "-P",
                "prefork",
                "--loglevel",
                "WARNING",
                "-Q",
                s.queue,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            s.wait_removed(deletions, timeout=deletions / 2 + 120)
            children = subprocess.run(
                ["pgrep", "-P", str(worker.pid)], capture_output=True, text=True
            ).stdout.split()
            cpu = cpu_seconds(worker.pid) + sum(cpu_seconds(int(pid)) for pid in children)
        finally:
            worker.terminate()
            worker.wait(30)
        span, rate = span_rate(s.stats(), deletions)
    return {"deletions_per_s": rate, "seconds": span, "cpu_s_per_deletion": cpu / deletions}


def latency_hiding(deletions: int, baseline_deletions: int) -> dict[str, float]:
    """200 ms per answer: the worker with 512 requests in flight against the baseline, same machine."""
    ours = throughput(deletions, 1000, 0.2, 512, follow=True)
    theirs = baseline(baseline_deletions, 0.2)
    return {
        "deletions_per_s": ours["deletions_per_s"],
        "baseline_per_s": theirs["deletions_per_s"],
        "ratio": ours["deletions_per_s"] / theirs["deletions_per_s"],
        "cpu_s_per_deletion": ours["cpu_s_per_deletion"],
        "baseline_cpu_s_per_deletion": theirs["cpu_s_per_deletion"],
    }


def rate_fidelity(rate: float, workers: int, deletions: int) -> dict[str, float]:
    """``workers`` processes share ``rate``; the simulator enforces it (bucket of rate/4)."""
    with stack(["--rate-limit", str(rate), "--rate-burst", str(max(1.0, rate / 4))]) as s:
        ids = s.seed(deletions)
        for _ in range(workers):
            s.start_worker(VBS_RATE_LIMIT=str(rate), VBS_RATE_BURST=str(max(1.0, rate / 8)))
        started = time.monotonic()
        s.enqueue(ids, 50)
        s.wait_removed(deletions, timeout=deletions / rate * 3 + 60)
        drain = time.monotonic() - started
        stats = s.stats()
    requests_sent = sum(stats["statuses"].values())  # deletes and job polls draw from the same bucket
    _, achieved = span_rate(stats, requests_sent)
    return {
        "achieved_per_s": achieved,
        "of_limit": achieved / rate,
        "throttled_ratio": stats["statuses"].get("429", 0) / requests_sent,
        "drain_s": drain,
        "drain_bound_s": requests_sent / rate,  # N deletions cost N deletes + their job polls
    }


def memory(deletions: int) -> dict[str, float]:
    """One worker over ``deletions``: RSS at the half-way mark and at the end; Redis bytes per item."""
    with stack([]) as s:
        ids = s.seed(deletions)
        client = redis.Redis.from_url(s.redis_url)
        base = s.redis_memory()
        probe = [str(uuid.uuid4()) for _ in range(10_000)]
        with Producer(s.redis_url, "bench.probe") as producer:
            for backup_id in probe:
                producer.delete_backup(PROJECT, backup_id)
        single = (s.redis_memory() - base) / len(probe)
        client.delete("bench.probe")
        base = s.redis_memory()
        s.enqueue(ids, 1000)
        batched = (s.redis_memory() - base) / deletions
        worker = s.start_worker()
        pid = worker.process.pid
        marks: dict[str, float] = {}
        with Sampler(lambda: rss_bytes(pid), 0.25) as sampler:
            processes.wait_until(
                lambda: s.stats()["removed"] >= deletions // 2, deletions / 50 + 60, "half", 0.1
            )
            marks["rss_half_mb"] = rss_bytes(pid) / 2**20
            s.wait_removed(deletions, timeout=deletions / 50 + 60)
            marks["rss_end_mb"] = rss_bytes(pid) / 2**20
        time.sleep(1)
        ledger_keys = sum(1 for _ in client.scan_iter(match="vbs:ledger:*", count=10_000))
        ledger_bytes = s.redis_memory() - base  # the queue is empty again: what stays is the ledger
    return {
        **marks,
        "rss_peak_mb": max(v for _, v in sampler.samples) / 2**20,
        "growth_half_to_end": marks["rss_end_mb"] / marks["rss_half_mb"] - 1,
        "redis_bytes_per_queued_single": single,
        "redis_bytes_per_queued_in_batch": batched,
        "redis_bytes_per_ledger_record": ledger_bytes / max(1, ledger_keys),
    }


def submit(count: int) -> dict[str, float]:
    """``vbs-deleter submit --file`` with ``count`` IDs into the queue."""
    with stack([]) as s:
        path = Path(tempfile.mkdtemp()) / "ids.txt"
        path.write_text("".join(f"{uuid.uuid4()}\n" for _ in range(count)))
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "worker.cli", "submit", "--project", PROJECT, "--file", str(path)],
            check=True,
            capture_output=True,
            env={**os.environ, "VBS_REDIS_URL": s.redis_url, "VBS_QUEUE": s.queue},
        )
        seconds = time.perf_counter() - started
        queued = redis.Redis.from_url(s.redis_url).llen(s.queue)
    return {"seconds": seconds, "tasks_queued": queued}


def scenarios(quick: bool) -> dict[str, Scenario]:
    n = 10 if quick else 1
    return {
        "overhead_batch": lambda: throughput(50_000 // n, 1000, 0.0, 64),
        "overhead_batch_jobs": lambda: throughput(50_000 // n, 1000, 0.0, 64, follow=True),
        "overhead_single": lambda: throughput(20_000 // n, 1, 0.0, 64),
        "latency_200ms": lambda: latency_hiding(30_000 // n, 200 // n),
        "rate_200x4": lambda: rate_fidelity(200, 4, 4000 // n),
        "rate_40x3": lambda: rate_fidelity(40, 3, 800 // n),
        "memory_100k": lambda: memory(100_000 // n),
        "submit_100k": lambda: submit(100_000 // n),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="scenario names")
    parser.add_argument("--quick", action="store_true", help="a tenth of the work (a smoke run)")
    args = parser.parse_args()
    chosen = {k: v for k, v in scenarios(args.quick).items() if not args.only or k in args.only}
    RESULTS.mkdir(exist_ok=True)
    report = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "runs": args.runs,
        "scenarios": {},
    }
    for name, scenario in chosen.items():
        runs = []
        for _ in range(args.runs):
            runs.append(scenario())
            print(name, json.dumps(runs[-1]), flush=True)
        report["scenarios"][name] = {"median": median_of(runs), "runs": runs}
    out = RESULTS / ("bench-quick.json" if args.quick else "bench.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'scenario':18} figure")
    for name, result in report["scenarios"].items():
        figures = ", ".join(f"{k}={v:.4g}" for k, v in result["median"].items())
        print(f"{name:18} {figures}")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
