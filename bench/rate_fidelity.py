"""Rate fidelity: N worker processes share one limit against a simulator that enforces the same limit.

Usage: python bench/rate_fidelity.py [--rate 40] [--workers 3] [--deletions 1200] [--runs 3]
Prints one JSON line per run and a median summary; writes bench/results/rate_fidelity-<rate>x<workers>.json.
Achieved rate = accepted deletions / (last - first API request seen by the simulator).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from worker import processes
from worker.producer import Producer

PROJECT = "be" * 16
RESULTS = Path(__file__).parent / "results"


def one_run(
    rate: float, workers: int, deletions: int, sim_burst: float, worker_burst: float
) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="vbs-bench-"))
    with contextlib.ExitStack() as stack:
        redis_child = stack.enter_context(processes.running(processes.start_redis(data_dir=workdir)))
        sim = stack.enter_context(
            processes.running(
                processes.start_simulator(
                    ["--rate-limit", str(rate), "--rate-burst", str(sim_burst)], log_path=workdir / "sim.log"
                )
            )
        )
        ids = processes.http_json(sim.url + "/_sim/seed", {"project_id": PROJECT, "count": deletions})["ids"]
        queue = f"bench.{uuid.uuid4().hex[:6]}"
        env = {
            "VBS_REDIS_URL": redis_child.url,
            "VBS_QUEUE": queue,
            "VBS_ENDPOINT": sim.url,
            "VBS_RATE_LIMIT": str(rate),
            "VBS_RATE_BURST": str(worker_burst),
            "VBS_LOG_LEVEL": "WARNING",
            "VBS_VISIBILITY_TIMEOUT": "100000",
        }
        for n in range(workers):
            worker = processes.start_worker(env, log_path=workdir / f"w{n}.log")
            stack.enter_context(processes.running(worker))
        producer = Producer(redis_child.url, queue)
        producer.delete_backups(PROJECT, ids, batch_size=50)
        producer.close()
        processes.wait_until(
            lambda: sum(processes.http_json(sim.url + "/_sim/stats")["remaining"].values()) == 0,
            deletions / rate * 3 + 60,
            "the run to finish",
            interval=0.2,
        )
        stats = processes.http_json(sim.url + "/_sim/stats")
    span = stats["request_times"]["last"] - stats["request_times"]["first"]
    requests = sum(stats["statuses"].values())
    return {
        "accepted": stats["accepted"],
        "requests": requests,
        "throttled": stats["statuses"].get("429", 0),
        "seconds": span,
        "achieved_rate": stats["accepted"] / span,
        "throttled_ratio": stats["statuses"].get("429", 0) / requests,
        "drain_bound_seconds": deletions / rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=40)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--deletions", type=int, default=1200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sim-burst", type=float, default=0, help="simulator bucket (default rate/4)")
    parser.add_argument("--worker-burst", type=float, default=0, help="worker bucket (default rate/8)")
    args = parser.parse_args()
    sim_burst = args.sim_burst or max(1.0, args.rate / 4)
    worker_burst = args.worker_burst or max(1.0, args.rate / 8)
    runs = []
    for _ in range(args.runs):
        run = one_run(args.rate, args.workers, args.deletions, sim_burst, worker_burst)
        print(json.dumps(run), flush=True)
        runs.append(run)
    summary = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    summary.update(
        rate_limit=args.rate,
        workers=args.workers,
        sim_burst=sim_burst,
        worker_burst=worker_burst,
        runs=args.runs,
        when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"rate_fidelity-{args.rate:g}x{args.workers}.json"
    out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")
    print(
        f"median achieved {summary['achieved_rate']:.2f}/s of {args.rate:g}/s "
        f"({summary['achieved_rate'] / args.rate:.1%}), 429s {summary['throttled_ratio']:.3%} -> {out}"
    )


if __name__ == "__main__":
    main()
