"""Start and stop the local pieces (Redis, simulator, worker) as child processes.

Used by ``vbs-deleter demo``, the tests and the benchmarks, so all of them run the real programs the
same way. Every child listens on loopback only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``check`` until it returns True; raise TimeoutError naming ``what`` after ``timeout`` seconds.

    Connection errors count as "not yet"; any other exception from ``check`` ends the wait.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, redis.RedisError):
            if check():
                return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def redis_answers(url: str) -> bool:
    """True when a Redis server answers PING at ``url``."""
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@dataclass
class Child:
    """A running child process and the URL it serves."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait; SIGKILL after ``timeout`` seconds. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def log_text(self) -> str:
        """What the child wrote to its log so far ('' when it has none)."""
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""


def start_redis(port: int | None = None, data_dir: Path | None = None, appendonly: bool = False) -> Child:
    """A private redis-server on 127.0.0.1 (optionally with append-only persistence in ``data_dir``)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
    port = port or free_port()
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="vbs-redis-"))
    args = [
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        "always",
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    child = Child(process, f"redis://127.0.0.1:{port}/0", extra={"dir": str(data_dir)})
    wait_until(lambda: redis_answers(child.url), 10, f"redis-server on port {port}")
    return child


def _spawn(args: list[str], env: Mapping[str, str] | None, log_path: Path | None) -> subprocess.Popen[bytes]:
    output = log_path.open("ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(
        args,
        env={**os.environ, **(env or {})},
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def start_simulator(options: list[str], log_path: Path | None = None) -> Child:
    """``vbs-deleter simulate`` on a free loopback port with ``options``; returns once it answers."""
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "worker.cli",
        "simulate",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *options,
    ]
    child = Child(_spawn(args, None, log_path), f"http://127.0.0.1:{port}", log_path)
    wait_until(lambda: http_ok(child.url + "/_sim/stats"), 15, "the simulator")
    return child


def start_worker(env: Mapping[str, str], log_path: Path | None = None, hostname: str | None = None) -> Child:
    """``vbs-deleter worker`` with ``env`` added to this environment; returns once /metrics answers.

    The metrics port is taken from ``VBS_METRICS_PORT`` in ``env``, or a free one is chosen.
    """
    port = int(env.get("VBS_METRICS_PORT") or free_port())
    args = [sys.executable, "-m", "worker.cli", "worker"]
    if hostname:
        args += ["--hostname", hostname]
    child_env = {"VBS_METRICS_HOST": "127.0.0.1", **env, "VBS_METRICS_PORT": str(port)}
    child = Child(_spawn(args, child_env, log_path), f"http://127.0.0.1:{port}", log_path)

    def ready() -> bool:
        if child.process.poll() is not None:
            raise RuntimeError(f"worker exited with {child.process.returncode}:\n{child.log_text()[-3000:]}")
        return http_ok(child.url + "/metrics")

    wait_until(ready, 60, "the worker's /metrics")
    return child


def start_prometheus(config: Path, data_dir: Path, log_path: Path | None = None) -> Child:
    """The Debian ``prometheus`` binary with ``config`` on a free loopback port; returns once it is ready."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not installed (Debian: apt-get install prometheus)")
    port = free_port()
    args = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--enable-feature=exemplar-storage",
    ]
    child = Child(_spawn(args, None, log_path), f"http://127.0.0.1:{port}", log_path)
    wait_until(lambda: http_ok(child.url + "/-/ready"), 60, "prometheus")
    return child


def http_ok(url: str) -> bool:
    """True when a GET of ``url`` answers 200 (an error status raises, as OSError)."""
    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


@contextlib.contextmanager
def running(child: Child) -> Iterator[Child]:
    """Stop ``child`` when the block ends, however it ends."""
    try:
        yield child
    finally:
        child.stop()


def http_json(url: str, body: object | None = None, timeout: float = 10.0) -> Any:
    """GET ``url`` (or POST ``body`` as JSON) and decode the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())
