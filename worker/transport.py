"""The HTTP transport shared by the VBS client and IAM: one session, TLS verification, proxies.

Proxies come from the standard ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` variables, resolved once
per client (aiohttp's ``trust_env`` would look them up in a thread on every request).
"""

from __future__ import annotations

import ssl
import urllib.request
from urllib.parse import urlsplit

import aiohttp

from worker.settings import Settings


def proxy_for(url: str) -> str | None:
    """The proxy the standard variables (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) give for ``url``, or None."""
    parts = urlsplit(url)
    if parts.hostname is None or urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def tls(settings: Settings) -> ssl.SSLContext | bool:
    """TLS verification for VBS and IAM: on (system CAs or ``ca_bundle``) unless ``verify_tls`` is off."""
    if not settings.verify_tls:
        return False
    if settings.ca_bundle is not None:
        return ssl.create_default_context(cafile=str(settings.ca_bundle))
    return True


def new_session(settings: Settings) -> aiohttp.ClientSession:
    """The one session of a worker process (VBS and IAM); create it inside the running loop that uses it.

    Proxies come from the standard ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` variables.
    """
    connector = aiohttp.TCPConnector(limit=settings.concurrency, ssl=tls(settings))
    timeout = aiohttp.ClientTimeout(
        total=settings.attempt_timeout, connect=settings.connect_timeout, sock_read=settings.read_timeout
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        trust_env=False,  # proxies come from proxy_for(), resolved once, not on every request
        headers={"Content-Type": "application/json", "Accept": "application/json"},
    )
