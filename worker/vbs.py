"""VBS HTTP client: the delete call per API mode and the parsing of its three error body shapes.

Knows nothing of retries or Celery: one call is one attempt, returned as an :class:`~worker.outcome.Answer`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import aiohttp

from worker.auth import Auth
from worker.outcome import Answer
from worker.settings import ApiMode, Settings

MAX_BODY = 64 * 1024  # bytes of an answer read at most; longer bodies are cut (and then parse as non-JSON)

_DELETE_ROUTES: dict[ApiMode, tuple[str, str]] = {
    "cloudbackups": ("POST", "/v2/{project_id}/cloudbackups/{backup_id}"),
    "native-v2": ("DELETE", "/v2/{project_id}/backups/{backup_id}"),
    "native-v3": ("DELETE", "/v3/{project_id}/backups/{backup_id}"),
}


def delete_route(api: ApiMode, project_id: str, backup_id: str) -> tuple[str, str]:
    """Method and path of the delete call. IDs are validated before they get here (no path characters)."""
    method, template = _DELETE_ROUTES[api]
    return method, template.format(project_id=project_id, backup_id=backup_id)


def parse_answer(status: int, headers: Mapping[str, str], body: bytes) -> Answer:
    """Turn a status, headers and raw body into an :class:`Answer` (pure).

    Understands the VBS shape ``{"error": {"code", "message"}}``, the native OpenStack shape
    ``{"<faultName>": {"code": int, "message"}}`` (the fault name becomes the error code) and the API
    gateway shape ``{"error_code", "error_msg", "request_id"}``. A body that is not JSON leaves the fields
    empty. ``job_id`` is taken from a 2xx body.
    """
    request_id = headers.get("X-Request-Id")
    retry_after = headers.get("Retry-After")
    data: Any = None
    if body:
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            data = None
    if not isinstance(data, dict):
        return Answer(status=status, request_id=request_id, retry_after=retry_after)
    if 200 <= status < 300:
        job_id = data.get("job_id")
        return Answer(
            status=status,
            job_id=job_id if isinstance(job_id, str) else None,
            request_id=request_id,
            retry_after=retry_after,
        )
    code: object = None
    message: object = None
    if "error_code" in data or "error_msg" in data:
        code, message = data.get("error_code"), data.get("error_msg")
        request_id = data.get("request_id") if isinstance(data.get("request_id"), str) else request_id
    elif isinstance(data.get("error"), dict):
        code, message = data["error"].get("code"), data["error"].get("message")
    elif len(data) == 1:
        fault, inner = next(iter(data.items()))
        if isinstance(inner, dict):
            code, message = fault, inner.get("message")
    return Answer(
        status=status,
        error_code=str(code) if code is not None else None,
        message=str(message) if message is not None else None,
        request_id=request_id,
        retry_after=retry_after,
    )


def _transport_error(exc: BaseException) -> str:
    """Bounded label for a failed attempt that got no HTTP answer."""
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return "disconnect"
    return "connection"


def new_session(settings: Settings) -> aiohttp.ClientSession:
    """The one session of a worker process; create it inside the running loop that will use it."""
    connector = aiohttp.TCPConnector(limit=settings.concurrency, ssl=settings.verify_tls)
    timeout = aiohttp.ClientTimeout(
        total=settings.attempt_timeout, connect=settings.connect_timeout, sock_read=settings.read_timeout
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=True,
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )


class VbsClient:
    """Calls VBS over one shared :class:`aiohttp.ClientSession`."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings, auth: Auth) -> None:
        self._session = session
        self._base = settings.endpoint.rstrip("/")
        self._api = settings.api
        self._auth = auth

    async def delete(self, project_id: str, backup_id: str) -> Answer:
        """One delete attempt. Never raises for HTTP or transport errors: they come back in the Answer."""
        method, path = delete_route(self._api, project_id, backup_id)
        url = self._base + path
        try:
            headers = await self._auth.headers(method, url, project_id)
            async with self._session.request(method, url, headers=headers, allow_redirects=False) as response:
                body = await response.content.read(MAX_BODY)
                return parse_answer(response.status, response.headers, body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return Answer(status=0, transport_error=_transport_error(exc))
