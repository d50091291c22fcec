"""The worker's HTTP session: TLS verification (on by default, custom CA bundle, off) and proxy variables."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from tests.test_auth import run, simulator
from tests.test_simulator import P
from worker.auth import StaticTokenAuth
from worker.settings import Settings
from worker.transport import new_session
from worker.vbs import VbsClient

DATA = Path(__file__).parent / "data"
BACKUP = "70a599e0-31e7-49b7-b260-868f441e862b"


@contextlib.asynccontextmanager
async def https_server() -> AsyncIterator[str]:
    """An HTTPS server on 127.0.0.1 with the self-signed test certificate, answering 204 on /."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(DATA / "localhost-test.pem", DATA / "localhost-test.key")

    async def empty(_: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/", empty)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}/"
    finally:
        await runner.cleanup()


async def status_of(settings: Settings, url: str) -> int:
    async with new_session(settings) as session, session.get(url) as response:
        return response.status


def test_tls_is_verified_unless_turned_off_and_a_ca_bundle_is_trusted() -> None:
    async def test() -> None:
        async with https_server() as url:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await status_of(Settings(), url)
            assert await status_of(Settings(ca_bundle=DATA / "localhost-test.pem"), url) == 204
            assert await status_of(Settings(verify_tls=False), url) == 204

    run(test)


@contextlib.asynccontextmanager
async def forward_proxy(seen: list[str]) -> AsyncIterator[str]:
    """A tiny HTTP forward proxy on loopback: records each request line, relays bytes both ways."""

    async def relay(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        line, _, rest = head.partition(b"\r\n")
        method, target, version = line.split(b" ")
        seen.append(line.decode())
        url = urlsplit(target.decode())
        upstream_reader, upstream_writer = await asyncio.open_connection(url.hostname, url.port)
        path = url.path + (f"?{url.query}" if url.query else "")
        upstream_writer.write(b" ".join([method, path.encode(), version]) + b"\r\n" + rest)
        await asyncio.gather(relay(reader, upstream_writer), relay(upstream_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def test_standard_proxy_variables_are_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)

    async def test() -> None:
        seen: list[str] = []
        async with simulator() as sim, forward_proxy(seen) as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy)
            settings = Settings(endpoint=sim)
            async with new_session(settings) as session:
                answer = await VbsClient(session, settings, StaticTokenAuth(None)).delete(P, BACKUP)
            assert answer.status == 404  # the simulator answered, through the proxy
            assert seen == [f"POST {sim}/v2/{P}/cloudbackups/{BACKUP} HTTP/1.1"]

    run(test)
