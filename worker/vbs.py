"""VBS HTTP client: the delete call per API mode, the job and backup reads that follow it, the backup
listing, and parsing of the error body shapes.

Knows nothing of retries or Celery: one delete call is one attempt, returned as an
:class:`~worker.outcome.Answer`; a listing either returns every page or raises :class:`ListingError`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from worker import metrics
from worker.auth import Auth, AuthError
from worker.outcome import Answer
from worker.settings import ApiMode, Settings
from worker.transport import proxy_for

MAX_BODY = 64 * 1024  # bytes of an answer read at most; longer bodies are cut (and then parse as non-JSON)

_DELETE_ROUTES: dict[ApiMode, tuple[str, str]] = {
    "cloudbackups": ("POST", "/v2/{project_id}/cloudbackups/{backup_id}"),
    "native-v2": ("DELETE", "/v2/{project_id}/backups/{backup_id}"),
    "native-v3": ("DELETE", "/v3/{project_id}/backups/{backup_id}"),
}


_SHOW_ROUTES: dict[ApiMode, str] = {
    "cloudbackups": "/v3/{project_id}/backups/{backup_id}",
    "native-v2": "/v2/{project_id}/backups/{backup_id}",
    "native-v3": "/v3/{project_id}/backups/{backup_id}",
}
JOB_ROUTE = "/v1/{project_id}/jobs/{job_id}"
Parser = Callable[[int, Mapping[str, str], bytes], Answer]


def delete_route(api: ApiMode, project_id: str, backup_id: str) -> tuple[str, str]:
    """Method and path of the delete call. IDs are validated before they get here (no path characters)."""
    method, template = _DELETE_ROUTES[api]
    return method, template.format(project_id=project_id, backup_id=backup_id)


LIST_PAGE = 1000  # the most backups VBS returns per list page
MAX_LIST_PAGES = 10_000  # a listing longer than this is refused as a paging loop


class ListingError(RuntimeError):
    """A backup listing failed part-way; ``pages`` were read before it, ``status`` 0 means no answer."""

    def __init__(self, message: str, pages: int, status: int = 0) -> None:
        super().__init__(message)
        self.pages = pages
        self.status = status


def next_query(body: Mapping[str, Any]) -> str | None:
    """The query string of the ``rel: next`` entry of ``backups_links`` (its host is never used), or None."""
    links = body.get("backups_links")
    if not isinstance(links, list):
        return None
    for link in links:
        if isinstance(link, dict) and link.get("rel") == "next" and isinstance(link.get("href"), str):
            return urlsplit(link["href"]).query or None
    return None


def _json_object(body: bytes) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _text(value: object) -> str | None:
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else None


def parse_job_answer(status: int, headers: Mapping[str, str], body: bytes) -> Answer:
    """An answer to ``GET /v1/{p}/jobs/{id}``: a 2xx carries ``state`` = the job's ``status`` and, on FAIL,
    ``error_code`` and ``message`` = the job's ``error_code`` and ``fail_reason``; errors as in
    :func:`parse_answer`."""
    answer = parse_answer(status, headers, body)
    data = _json_object(body) if 200 <= status < 300 else None
    if data is None:
        return answer
    return dataclasses.replace(
        answer,
        state=_text(data.get("status")),
        error_code=_text(data.get("error_code")),
        message=_text(data.get("fail_reason")),
    )


def parse_backup_answer(status: int, headers: Mapping[str, str], body: bytes) -> Answer:
    """An answer to ``GET /v2|v3/{p}/backups/{id}``: a 2xx carries ``state`` = the backup's ``status`` and
    ``message`` = its ``fail_reason``; errors (404 when it is gone) as in :func:`parse_answer`."""
    answer = parse_answer(status, headers, body)
    data = _json_object(body) if 200 <= status < 300 else None
    backup = data.get("backup") if data is not None else None
    if not isinstance(backup, dict):
        return answer
    return dataclasses.replace(
        answer, state=_text(backup.get("status")), message=_text(backup.get("fail_reason"))
    )


def parse_answer(status: int, headers: Mapping[str, str], body: bytes) -> Answer:
    """Turn a status, headers and raw body into an :class:`Answer` (pure).

    Understands the VBS shape ``{"error": {"code", "message"}}``, the native OpenStack shape
    ``{"<faultName>": {"code": int, "message"}}`` (the fault name becomes the error code) and the API
    gateway shape ``{"error_code", "error_msg", "request_id"}``. A body that is not JSON leaves the fields
    empty. ``job_id`` is taken from a 2xx body.
    """
    request_id = headers.get("X-Request-Id")
    retry_after = headers.get("Retry-After")
    data = _json_object(body)
    if data is None:
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


class VbsClient:
    """Calls VBS over one shared :class:`aiohttp.ClientSession`."""

    def __init__(self, session: aiohttp.ClientSession, settings: Settings, auth: Auth) -> None:
        self._session = session
        self._base = settings.endpoint.rstrip("/")
        self._proxy = proxy_for(self._base)
        self._api = settings.api
        self._auth = auth

    async def _request(
        self, method: str, url: str, project_id: str, max_body: int | None
    ) -> tuple[int, Mapping[str, str], bytes, bool]:
        """One authenticated request, redirects not followed: status, headers, body (at most ``max_body``
        bytes) and whether a 401 is worth one more attempt with fresh credentials. The auth hears every
        status (0: no answer). Raises :class:`AuthError` (nothing sent) and aiohttp's transport errors."""
        headers = await self._auth.headers(method, url, project_id)
        status = 0
        try:
            async with self._session.request(
                method, url, headers=headers, allow_redirects=False, proxy=self._proxy
            ) as response:
                body = await (response.read() if max_body is None else response.content.read(max_body))
                status, answer_headers = response.status, response.headers
        finally:
            retry = self._auth.answered(project_id, headers, status)
        if status == 401:
            metrics.AUTH_FAILURES.labels(self._auth.mode).inc()
        return status, answer_headers, body, retry and status == 401

    async def delete(self, project_id: str, backup_id: str) -> Answer:
        """One delete attempt. Never raises for HTTP, transport or auth errors: they come back in the Answer
        (``auth_error`` when no credentials could be had, ``auth_retry`` after a 401 worth retrying)."""
        method, path = delete_route(self._api, project_id, backup_id)
        return await self._call(method, path, project_id, parse_answer)

    async def get_job(self, project_id: str, job_id: str) -> Answer:
        """One read of a deletion job (``job_id`` must already be checked: no path characters)."""
        path = JOB_ROUTE.format(project_id=project_id, job_id=job_id)
        return await self._call("GET", path, project_id, parse_job_answer)

    async def get_backup(self, project_id: str, backup_id: str) -> Answer:
        """One read of a backup with the API version of the delete mode; 404 means it is gone."""
        path = _SHOW_ROUTES[self._api].format(project_id=project_id, backup_id=backup_id)
        return await self._call("GET", path, project_id, parse_backup_answer)

    async def _call(self, method: str, path: str, project_id: str, parse: Parser) -> Answer:
        """One attempt of any call as an :class:`Answer`; never raises for HTTP, transport or auth errors."""
        try:
            status, headers, body, retry = await self._request(
                method, self._base + path, project_id, MAX_BODY
            )
        except AuthError as exc:
            return Answer(status=0, error_code=f"auth.{exc.reason}", message=str(exc), auth_error=exc.reason)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return Answer(status=0, transport_error=_transport_error(exc))
        answer = parse(status, headers, body)
        return dataclasses.replace(answer, auth_retry=True) if retry else answer

    async def list_backups(
        self,
        project_id: str,
        on_page: Callable[[int, float], None] | None = None,
        before_page: Callable[[], Awaitable[object]] | None = None,
    ) -> list[dict[str, Any]]:
        """Every backup of the project: ``GET /v3/{p}/backups/detail`` pages of at most 1000, following the
        next link's query string against the configured endpoint. ``before_page()`` is awaited before each
        request (a rate limiter), ``on_page(status, seconds)`` called after it. Raises
        :class:`ListingError` on any failed page (the caller must not act on a part).
        """
        path = f"{self._base}/v3/{project_id}/backups/detail"
        query: str | None = f"limit={LIST_PAGE}"
        backups: list[dict[str, Any]] = []
        seen: set[str] = set()
        pages = 0
        while query is not None:
            if query in seen or pages >= MAX_LIST_PAGES:
                raise ListingError(f"listing of {project_id} loops at page {pages + 1}", pages)
            seen.add(query)
            url = f"{path}?{query}"
            if before_page is not None:
                await before_page()
            started = asyncio.get_running_loop().time()
            try:
                status, answer_headers, body, _ = await self._request("GET", url, project_id, None)
            except AuthError as exc:
                raise ListingError(f"page {pages + 1} of {project_id}: {exc}", pages) from None
            except (TimeoutError, aiohttp.ClientError) as exc:
                if on_page is not None:
                    on_page(0, asyncio.get_running_loop().time() - started)
                raise ListingError(
                    f"page {pages + 1} of {project_id}: no answer ({_transport_error(exc)})", pages
                ) from None
            if on_page is not None:
                on_page(status, asyncio.get_running_loop().time() - started)
            data: Any = None
            if status == 200:
                try:
                    data = json.loads(body)
                except (ValueError, UnicodeDecodeError):
                    data = None
            if not isinstance(data, dict) or not isinstance(data.get("backups"), list):
                answer = parse_answer(status, answer_headers, body)
                detail = f"{answer.error_code}: {answer.message}" if answer.error_code else "unexpected body"
                raise ListingError(
                    f"page {pages + 1} of {project_id}: status {status} ({detail}), "
                    f"request id {answer.request_id}",
                    pages,
                    status,
                )
            backups.extend(data["backups"])
            pages += 1
            query = next_query(data)
        return backups
