"""``vbs-deleter`` subcommands: worker, simulate, demo."""

from __future__ import annotations

import argparse
import sys

from worker.settings import SettingsError, load_settings


def _worker(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"vbs-deleter: {exc}", file=sys.stderr)
        return 2
    from worker.tasks import app

    argv = [
        "worker",
        "-P",
        "threads",
        "-c",
        str(settings.concurrency),
        "-Q",
        settings.queue,
        "--loglevel",
        settings.log_level,
        "--without-gossip",
        "--without-mingle",
    ]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    app.worker_main(argv)
    return 0


def _simulate(argv: list[str]) -> int:
    from worker import simulator

    return int(simulator.main(argv))


def _demo(args: argparse.Namespace) -> int:
    from worker import demo

    return demo.main(count=args.count, fault_rate=args.fault_rate, ghost_rate=args.ghost_rate)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vbs-deleter`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["simulate"]:
        return _simulate(argv[1:])
    parser = argparse.ArgumentParser(prog="vbs-deleter", description="Bulk deletion worker for VBS backups.")
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="consume deletion tasks (settings from VBS_* variables)")
    worker.add_argument("--hostname", help="Celery node name (default: celery@<host>)")
    commands.add_parser("simulate", help="run a local VBS simulator (see 'vbs-deleter simulate --help')")
    demo = commands.add_parser("demo", help="simulator + worker + 1,000 deletions with injected faults")
    demo.add_argument("--count", type=int, default=1000, help="deletions to enqueue (default 1000)")
    demo.add_argument("--fault-rate", type=float, default=0.05, help="fraction answered 408/503/504")
    demo.add_argument("--ghost-rate", type=float, default=0.02, help="fraction deleted yet answered 504")
    args = parser.parse_args(argv)
    handlers = {"worker": _worker, "demo": _demo}
    return handlers[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
