"""``vbs-deleter check-config``: validate the settings, reach Redis and VBS, print the effective settings.

Checks run in order; each prints one line. Exit status: 0 every check passed; 2 the settings (or the
retention policy file) are invalid; 3 Redis does not answer; 4 the VBS endpoint gives no usable answer;
5 VBS refuses the credentials (401/403). With several failures the first one's status is returned.
Secrets are never printed: secret settings show as set or unset, passwords in URLs as ``***``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO, cast
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import redis
import redis.asyncio as aioredis
from pydantic import SecretStr

from worker.auth import AuthError, make_auth
from worker.settings import CONFIG_FILE_VARIABLE, Settings, SettingsError, env_name, load_settings
from worker.transport import new_session, proxy_for
from worker.vbs import MAX_BODY, parse_answer

OK, BAD_SETTINGS, NO_REDIS, NO_ENDPOINT, BAD_CREDENTIALS = 0, 2, 3, 4, 5
TOKEN_TIMEOUT = 15.0  # seconds to wait for a token of the shared rate limit before giving up


@dataclass(frozen=True)
class Check:
    """One check's verdict; ``status`` is the exit status it stands for (0 when it passed)."""

    name: str
    status: int
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.status == OK else 'FAIL':4}  {self.name:12} {self.detail}"


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (user names stay: they help and are no secret)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def shown(value: object) -> str:
    """A setting's value as printed: secrets masked, URLs without passwords, lists sorted."""
    if isinstance(value, SecretStr):
        return "*** (set)"
    if value is None:
        return "(unset)"
    if isinstance(value, frozenset):
        return ",".join(str(item) for item in sorted(value))
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    return str(value)


def effective(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """One line per setting: ``VBS_NAME = value  (env|file|default)``."""
    lines = []
    for name in Settings.model_fields:
        source = (
            "env" if env_name(name) in environ else "file" if name in settings.model_fields_set else "default"
        )
        lines.append(f"{env_name(name):24} = {shown(getattr(settings, name)):40} ({source})")
    return lines


def check_redis(settings: Settings) -> Check:
    """PING, the server version, and a warning when append-only persistence is off."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=3, socket_connect_timeout=3)
    where = mask_url(settings.redis_url)
    try:
        client.ping()
        version = cast(dict[str, Any], client.info("server")).get("redis_version", "?")
        try:
            appendonly = cast(dict[str, str], client.config_get("appendonly")).get("appendonly", "?")
        except redis.ResponseError:  # CONFIG is often disabled on managed Redis
            appendonly = "unknown (CONFIG refused)"
    except (redis.RedisError, OSError) as exc:
        return Check("redis", NO_REDIS, f"{where} does not answer: {exc}")
    finally:
        client.close()
    note = "" if appendonly == "yes" else f"; warning: appendonly is {appendonly}, a restart loses the queue"
    return Check("redis", OK, f"{where} answers (Redis {version}){note}")


async def _probe(settings: Settings, project_id: str | None, redis_ok: bool) -> list[Check]:
    """One harmless call: list one backup of ``project_id`` (credentials checked), or GET the base URL."""
    from worker.beat import lister  # the listing's rate limiter, as the beat uses it

    endpoint = mask_url(settings.endpoint)
    async with new_session(settings) as session:
        client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=3, socket_connect_timeout=3)
        try:
            if project_id is None:
                url, headers = settings.endpoint, {}
            else:
                if redis_ok:  # the limiter waits for Redis forever: only ask it when Redis answers
                    limiter = lister(session, client, settings).limiter
                    try:
                        await asyncio.wait_for(limiter.acquire(), TOKEN_TIMEOUT)
                    except TimeoutError:
                        why = (
                            f"no token of the shared rate limit in {TOKEN_TIMEOUT:.0f}s (paused after 429s?)"
                        )
                        return [Check("endpoint", NO_ENDPOINT, why)]
                url = f"{settings.endpoint.rstrip('/')}/v3/{project_id}/backups/detail?limit=1"
                auth = make_auth(settings, session, client, remember_failures=False)
                headers = await auth.headers("GET", url, project_id)
            async with session.get(
                url, headers=headers, allow_redirects=False, proxy=proxy_for(url)
            ) as response:
                status, body = response.status, await response.content.read(MAX_BODY)
                answer = parse_answer(status, response.headers, body)
        except AuthError as exc:
            verdict = NO_ENDPOINT if exc.reason == "iam_unavailable" else BAD_CREDENTIALS
            return [Check("credentials", verdict, f"no credentials for project {project_id}: {exc}")]
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return [Check("endpoint", NO_ENDPOINT, f"{endpoint} gives no answer: {type(exc).__name__} {exc}")]
        finally:
            await client.aclose()
    if project_id is None:
        return [
            Check("endpoint", OK, f"{endpoint} answers (HTTP {status})"),
            Check("credentials", OK, "not checked: give --project PROJECT_ID to make one list call"),
        ]
    reached = Check("endpoint", OK, f"{endpoint} answers")
    why = f"HTTP {status} {answer.error_code or ''} {answer.message or ''} request id {answer.request_id}"
    if status in (401, 403):
        return [reached, Check("credentials", BAD_CREDENTIALS, f"refused for project {project_id}: {why}")]
    if status != 200:
        return [Check("endpoint", NO_ENDPOINT, f"{endpoint}: listing project {project_id} gave {why}")]
    return [reached, Check("credentials", OK, f"accepted: listed backups of project {project_id}")]


def run(project_id: str | None, environ: Mapping[str, str], out: TextIO = sys.stdout) -> int:
    """Run every check, print the effective settings and the verdicts; returns the exit status."""
    try:
        settings = load_settings(environ)
    except SettingsError as exc:
        print(f"FAIL  settings     {exc}", file=out)
        return BAD_SETTINGS
    if environ.get(CONFIG_FILE_VARIABLE):
        print(f"settings file: {environ[CONFIG_FILE_VARIABLE]}", file=out)
    print("\n".join(effective(settings, environ)), file=out)
    print(
        f"\nlongest unacknowledged task {settings.longest_unacked():.0f}s, VBS_VISIBILITY_TIMEOUT "
        f"{settings.visibility_timeout}s; SIGTERM to exit at most {settings.stop_timeout():.0f}s "
        "(give orchestrators a longer stop timeout)\n",
        file=out,
    )
    try:
        settings.check_delivery()
    except SettingsError as exc:
        print(f"FAIL  settings     {exc}", file=out)
        return BAD_SETTINGS
    checks = [Check("settings", OK, "valid")]
    if settings.retention_file is not None:
        checks.append(_check_policies(settings))
    checks.append(check_redis(settings))
    checks += asyncio.run(_probe(settings, project_id, checks[-1].status == OK))
    for check in checks:
        print(check.line(), file=out)
    return next((check.status for check in checks if check.status != OK), OK)


def _check_policies(settings: Settings) -> Check:
    from worker.beat import load
    from worker.retention import PolicyError

    try:
        policies = load(settings)
    except PolicyError as exc:
        return Check("retention", BAD_SETTINGS, str(exc))
    return Check("retention", OK, f"{len(policies)} policies in {settings.retention_file}")
