"""``vbs-deleter`` subcommands: worker, simulate, demo, status, dlq, submit, retention, beat, check-config."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import redis

from worker import ledger
from worker.contract import MAX_BATCH
from worker.settings import Settings, SettingsError, load_settings


def _worker(args: argparse.Namespace) -> int:
    try:
        settings = load_settings()
        settings.check_delivery()
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


def _settings_or_exit() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise SystemExit(f"vbs-deleter: {exc}") from None


def _status(args: argparse.Namespace) -> int:
    client = redis.Redis.from_url(_settings_or_exit().redis_url)
    records = ledger.read_record(client, args.backup_id, args.project)
    if args.json:
        print(json.dumps(records, indent=2, sort_keys=True))
    elif not records:
        print(f"no ledger record for {args.backup_id}")
    for record in [] if args.json else records:
        print("\n".join(f"{key:16} {value}" for key, value in sorted(record.items())) + "\n")
    return 0 if records else 1


def _dlq(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    client = redis.Redis.from_url(settings.redis_url)
    letters = ledger.dead_letters(client)
    if args.dlq_command == "list":
        if args.json:
            print(json.dumps([asdict(letter) for letter in letters], indent=2))
            return 0
        print(f"{len(letters)} dead letter(s)")
        for letter in letters:
            what = f"{letter.project_id}/{letter.backup_id}" if letter.kind == "deletion" else letter.entry_id
            print(
                f"  {what}  {letter.reason}  status={letter.status} code={letter.error_code} "
                f"attempts={letter.attempts} request_id={letter.request_id} {letter.message or ''}"
            )
        return 0
    if args.dlq_command == "purge":
        print(f"purged {ledger.purge_dead_letters(client)} dead letter(s)")
        return 0
    return _replay(settings, client, letters, args)


def _replay(
    settings: Settings, client: redis.Redis, letters: list[ledger.DeadLetter], args: argparse.Namespace
) -> int:
    """Re-enqueue dead-lettered deletions (rejected tasks cannot be replayed: they broke the contract)."""
    from worker.producer import Producer

    if not args.all and not args.backup_ids:
        raise SystemExit("vbs-deleter dlq replay: give --all or BACKUP_ID ...")
    wanted = set(args.backup_ids)
    chosen = [
        letter for letter in letters if letter.kind == "deletion" and (args.all or letter.backup_id in wanted)
    ]
    unknown = wanted - {letter.backup_id for letter in chosen}
    by_project: dict[str, list[str]] = {}
    for letter in chosen:
        by_project.setdefault(str(letter.project_id), []).append(str(letter.backup_id))
    # Remove first, then enqueue: a replayed deletion that fails again writes a new letter, which must stay.
    removed = ledger.remove_dead_letters(client, [letter.entry_id for letter in chosen])
    producer = Producer(settings.redis_url, settings.queue)
    try:
        for project_id, ids in by_project.items():
            producer.delete_backups(project_id, ids, request_id="dlq-replay", batch_size=MAX_BATCH)
    except Exception:
        ledger.add_dead_letters(client, chosen)  # nothing lost: the letters are back for another try
        raise
    finally:
        producer.close()
    skipped = sum(1 for letter in letters if letter.kind != "deletion") if args.all else 0
    print(
        f"replayed {removed} deletion(s)"
        + (f"; {skipped} rejected task(s) left (cannot replay)" if skipped else "")
    )
    for backup_id in sorted(unknown):
        print(f"not in the dead-letter store: {backup_id}", file=sys.stderr)
    return 1 if unknown else 0


def _check_config(args: argparse.Namespace) -> int:
    import os

    from worker import checks

    return checks.run(args.project, os.environ)


def _project_id(text: str) -> str:
    from worker.contract import is_project_id

    if not is_project_id(text):
        raise argparse.ArgumentTypeError("must be 32 hex characters")
    return text


def _simulate(argv: list[str]) -> int:
    from worker import simulator

    return int(simulator.main(argv))


def _demo(args: argparse.Namespace) -> int:
    from worker import demo

    return demo.main(count=args.count, fault_rate=args.fault_rate, ghost_rate=args.ghost_rate)


def _submit(args: argparse.Namespace) -> int:
    from worker import submit

    return submit.run(
        _settings_or_exit(),
        project_id=args.project,
        ids=args.backup_ids,
        source=args.file,
        fmt=args.format,
        strict=args.strict,
        dry_run=args.dry_run,
        batch_size=args.batch_size,
        request_id=args.request_id,
    )


def _batch_size(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_BATCH}")
    return value


def _add_submit(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from worker.submit import FORMATS

    sub = commands.add_parser(
        "submit",
        help="enqueue deletions of backup IDs from arguments, a file or stdin",
        description="Validate backup IDs and enqueue them as vbs.delete_backups tasks. Input: plain lines, "
        "CSV with a header naming backup_id (and project_id), or JSON lines; format detected from the "
        "first line. Exit status 0 all sent, 1 bad lines, 2 unusable input, 3 broker failure.",
    )
    sub.add_argument("backup_ids", nargs="*", metavar="BACKUP_ID", help="backup IDs (or use --file)")
    sub.add_argument("--project", help="project of records that name none (32 hex characters)")
    sub.add_argument("--file", metavar="F", help="read records from F ('-' for stdin)")
    sub.add_argument("--format", choices=FORMATS, default="auto", help="input format (default: auto)")
    sub.add_argument("--strict", action="store_true", help="refuse the whole input if any line is bad")
    sub.add_argument("--dry-run", action="store_true", help="validate and count, enqueue nothing")
    sub.add_argument(
        "--batch-size", type=_batch_size, default=MAX_BATCH, help=f"IDs per task (1..{MAX_BATCH})"
    )
    sub.add_argument("--request-id", help="correlation id logged by the worker (default: submit-<random>)")


def _retention(args: argparse.Namespace) -> int:
    from worker import beat
    from worker.retention import PolicyError

    settings = _settings_or_exit()
    try:
        if args.command == "beat":
            return beat.main(settings, beat.load(settings))
        return beat.command(settings, args.policy, args.action == "run", args.json)
    except PolicyError as exc:
        print(f"vbs-deleter: {exc}", file=sys.stderr)
        return 2


def _add_retention(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    retention = commands.add_parser("retention", help="plan or run the retention policies once")
    actions = retention.add_subparsers(dest="action", required=True)
    for action, text in (
        ("plan", "print what the policies would delete and why (nothing is enqueued)"),
        ("run", "list, plan and enqueue the deletions now"),
    ):
        parser = actions.add_parser(action, help=text, description=text)
        parser.add_argument("--policy", help="only this policy (default: every policy in VBS_RETENTION_FILE)")
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    commands.add_parser(
        "beat", help="run the retention policies on their schedules (metrics on VBS_BEAT_METRICS_PORT)"
    )


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
    status = commands.add_parser("status", help="print a backup's ledger record")
    status.add_argument("backup_id")
    status.add_argument("--project", help="project ID (default: look in every project)")
    status.add_argument("--json", action="store_true", help="print JSON")
    dlq = commands.add_parser("dlq", help="dead letters: list, replay, purge")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_commands.add_parser("list", help="list dead letters, oldest first").add_argument(
        "--json", action="store_true"
    )
    replay = dlq_commands.add_parser("replay", help="re-enqueue dead-lettered deletions (deduplicated)")
    replay.add_argument("--all", action="store_true", help="every dead-lettered deletion")
    replay.add_argument("backup_ids", nargs="*", metavar="BACKUP_ID")
    dlq_commands.add_parser("purge", help="delete every dead letter")
    check = commands.add_parser(
        "check-config",
        help="validate the settings, reach Redis and VBS, print the effective settings (secrets masked)",
        description="Validate the settings and the retention file, PING Redis, make one harmless call to "
        "VBS (with --project: list one backup, which checks the credentials) and print the effective "
        "settings with secrets masked. Exit status 0 ok, 2 invalid settings, 3 Redis does not answer, "
        "4 the endpoint gives no usable answer, 5 the credentials are refused.",
    )
    check.add_argument("--project", type=_project_id, help="project to list one backup of (32 hex)")
    _add_submit(commands)
    _add_retention(commands)
    args = parser.parse_args(argv)
    handlers = {"worker": _worker, "demo": _demo, "status": _status, "dlq": _dlq, "submit": _submit}
    handlers |= {"retention": _retention, "beat": _retention, "check-config": _check_config}
    return handlers[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
