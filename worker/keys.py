"""Every Redis key the worker owns (besides Celery's own queue keys), in one place.

All keys start with ``vbs:``. Records expire (see ``VBS_LEDGER_TTL``); nothing here is ever flushed.
Lua scripts touch keys not passed in KEYS (a worker's heartbeat), so a single Redis (not Cluster) is assumed.
"""

PREFIX = "vbs:"
DEAD_LETTERS = PREFIX + "dlq"  # hash: entry id -> JSON dead letter
DEAD_LETTER_ORDER = PREFIX + "dlq:order"  # sorted set: entry id scored by time of arrival (seconds)
FOLLOWING = PREFIX + "following"  # sorted set: ledger keys of accepted deletions whose job is followed,
# scored by when their follower was last known (Unix seconds); the follower is the record's ``owner``


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
    """JSON ``{"token", "expires_at", "refresh_at"}`` (unix seconds) of the project's IAM token; expires
    with the token. The only key whose value is a secret."""
    return f"{PREFIX}iam-token:{project_id}"


def iam_lock(project_id: str) -> str:
    """Held (random owner id, with a TTL) by the one worker asking IAM for the project's token."""
    return f"{PREFIX}iam-lock:{project_id}"


def aksk_rejections(access_key: str) -> str:
    """Counter of consecutive signature rejections of one access key across the fleet (expires)."""
    return f"{PREFIX}aksk-rejections:{access_key}"


def iam_failure(project_id: str) -> str:
    """Set for a while after IAM refused or failed the project's token: the reason, so no one asks again."""
    return f"{PREFIX}iam-failure:{project_id}"
