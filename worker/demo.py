"""``make demo``: a simulator that misbehaves, one worker, and N deletions, ending with a summary.

The simulator injects 408/503/504 faults and ghost 504s (deleted, yet answered 504); 2% of the IDs never
existed and 1% of the backups can never be deleted (VolumeBackup.0113). The invariant checked at the end:
no backup was deleted more than once, and every deletable backup is gone.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from worker import processes, progress
from worker.producer import Producer
from worker.scrape import by_label, scrape, total
from worker.settings import SettingsError, load_settings

PROJECT_ID = "0" * 24 + "de3000de"


def main(count: int = 1000, fault_rate: float = 0.05, ghost_rate: float = 0.02) -> int:
    """Run the demo; exit status 0 when the invariant holds."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"vbs-deleter: {exc}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="vbs-demo-"))
    with contextlib.ExitStack() as stack:
        redis_url = settings.redis_url
        if not processes.redis_answers(redis_url):
            try:
                redis_child = processes.start_redis(data_dir=workdir)
            except RuntimeError:
                print(
                    f"No Redis answers at {redis_url} and redis-server is not installed.\n"
                    "Install it (Debian: apt-get install redis-server) or set VBS_REDIS_URL.",
                    file=sys.stderr,
                )
                return 2
            stack.enter_context(processes.running(redis_child))
            redis_url = redis_child.url
            print(f"no Redis at {settings.redis_url}: started a private one at {redis_url}")
        token = uuid.uuid4().hex
        sim = stack.enter_context(
            processes.running(
                processes.start_simulator(
                    ["--fault-rate", str(fault_rate), "--ghost-rate", str(ghost_rate), "--token", token],
                    log_path=workdir / "simulator.log",
                )
            )
        )
        missing = count // 50
        undeletable = count // 100
        deletable = processes.http_json(
            sim.url + "/_sim/seed", {"project_id": PROJECT_ID, "count": count - missing - undeletable}
        )
        ids: list[str] = deletable["ids"]
        blocked = processes.http_json(
            sim.url + "/_sim/seed",
            {"project_id": PROJECT_ID, "backups": [{"undeletable": True} for _ in range(undeletable)]},
        )["ids"]
        ids = ids + blocked + [str(uuid.uuid4()) for _ in range(missing)]
        queue = "vbs.demo"  # the demo's own queue: emptied first, so an aborted run leaves nothing behind
        redis.Redis.from_url(redis_url).delete(queue)
        worker = stack.enter_context(
            processes.running(
                processes.start_worker(
                    {
                        "VBS_REDIS_URL": redis_url,
                        "VBS_QUEUE": queue,
                        "VBS_ENDPOINT": sim.url,
                        "VBS_AUTH_TOKEN": token,
                        "VBS_BACKOFF_BASE": "0.05",
                        "VBS_BACKOFF_MAX": "1",
                        "VBS_LOG_LEVEL": "WARNING",
                    },
                    log_path=workdir / "worker.log",
                )
            )
        )
        print(f"simulator {sim.url}, worker metrics {worker.url}/metrics, queue {queue}, logs in {workdir}")
        producer = Producer(redis_url, queue)
        started = time.monotonic()
        singles = ids[: count // 10]
        for backup_id in singles:
            producer.delete_backup(PROJECT_ID, backup_id, request_id="demo")
        producer.delete_backups(PROJECT_ID, ids[len(singles) :], request_id="demo", batch_size=100)
        producer.close()
        done = 0.0
        deadline = started + max(120.0, count / 10)
        while time.monotonic() < deadline:
            done = total(scrape(worker.url + "/metrics"), "vbs_deleter_deletions_total")
            progress.draw(sys.stdout, done, count, started)
            if done >= count:
                break
            time.sleep(0.25)
        elapsed = time.monotonic() - started
        print()
        samples = scrape(worker.url + "/metrics")
        stats = processes.http_json(sim.url + "/_sim/stats")
    outcomes = by_label(samples, "vbs_deleter_deletions_total", "outcome")
    failures = by_label(samples, "vbs_deleter_deletion_failures_total", "error_code")
    retries = by_label(samples, "vbs_deleter_retries_total", "reason")
    left = sum(stats["remaining"].values()) - undeletable
    print("summary")
    print(f"  deleted (accepted)      {int(outcomes.get('accepted', 0))}")
    print(f"  already gone            {int(outcomes.get('already_gone', 0))}  (never existed, or ghost 504)")
    print(f"  duplicates skipped      {int(outcomes.get('duplicate', 0))}")
    print(
        f"  failed                  {int(outcomes.get('failed', 0))}  by code: "
        + (", ".join(f"{code}={int(n)}" for code, n in sorted(failures.items())) or "-")
    )
    print(
        "  retries by reason       " + (", ".join(f"{r}={int(n)}" for r, n in sorted(retries.items())) or "-")
    )
    print(f"  faults injected         {stats['faults_injected']} (ghost 504s: {stats['ghosts_injected']})")
    print(f"  achieved rate           {done / elapsed:.1f} deletions/s over {elapsed:.2f}s")
    print(f"  deleted more than once  {stats['deleted_more_than_once']} (must be 0)")
    print(f"  deletable left behind   {left} (must be 0)")
    ok = done >= count and stats["deleted_more_than_once"] == 0 and left == 0
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1
