"""How requests to VBS are authenticated, behind one small interface.

An :class:`Auth` returns the headers for one request. Secrets stay inside the object: they never appear in
its ``repr``, in exceptions or in logs.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import SecretStr


class Auth(Protocol):
    """Supplies authentication headers for one request to ``url`` on behalf of ``project_id``."""

    async def headers(self, method: str, url: str, project_id: str) -> dict[str, str]: ...


class StaticTokenAuth:
    """A fixed token sent as ``X-Auth-Token`` (``VBS_AUTH_TOKEN``); no token sends no header."""

    def __init__(self, token: SecretStr | None) -> None:
        self._headers = {"X-Auth-Token": token.get_secret_value()} if token is not None else {}

    def __repr__(self) -> str:
        return "StaticTokenAuth(token=***)" if self._headers else "StaticTokenAuth(token=None)"

    async def headers(self, method: str, url: str, project_id: str) -> dict[str, str]:
        return self._headers
