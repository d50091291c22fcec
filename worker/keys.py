"""Every Redis key the worker owns (besides Celery's own queue keys), in one place.

All keys start with ``vbs:``. Records expire (see ``VBS_LEDGER_TTL``); nothing here is ever flushed.
Lua scripts touch keys not passed in KEYS (a worker's heartbeat), so a single Redis (not Cluster) is assumed.
"""

PREFIX = "vbs:"
DEAD_LETTERS = PREFIX + "dlq"  # hash: entry id -> JSON dead letter
DEAD_LETTER_ORDER = PREFIX + "dlq:order"  # sorted set: entry id scored by time of arrival (seconds)


def ledger(project_id: str, backup_id: str) -> str:
    """Hash holding one backup's ledger record."""
    return f"{PREFIX}ledger:{project_id}:{backup_id}"


def bucket(name: str) -> str:
    """Hash holding the shared token bucket ``name`` (``delete`` or ``poll``)."""
    return f"{PREFIX}ratelimit:{name}"


def heartbeat(owner: str) -> str:
    """String that exists while the worker ``owner`` is alive (short TTL, refreshed)."""
    return f"{PREFIX}worker:{owner}"


def iam_token(project_id: str) -> str:
    """Shared IAM token cache for one project."""
    return f"{PREFIX}iam-token:{project_id}"
