"""A producer written in Node with celery-node enqueues deletions that the worker completes.

celery-node sends Celery protocol 2 with the JSON serializer, ``[args, kwargs, {}]`` bodies and
``lang: js`` headers; our tasks take keyword arguments only, so the script passes ``[]`` as args.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import PROJECT, Sim, Worker
from worker.scrape import by_label

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="session")
def node_producer() -> Path:
    """tests/node with its packages installed (``npm ci``); skipped only when npm is not installed."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("npm/node not installed (Debian: apt-get install nodejs npm); .ci/run installs them")
    if not (NODE_DIR / "node_modules" / "celery-node").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
            capture_output=True,
        )
    return NODE_DIR / "produce.js"


def test_celery_node_producer(
    node_producer: Path, sim: Sim, start_worker: Callable[..., Worker], redis_url: str, queue: str
) -> None:
    seeded = sim.seed(1200)
    missing = str(uuid.uuid4())
    worker = start_worker(sim, VBS_RATE_LIMIT="0")  # 1,201 deletions: no need to wait for the shared limit
    subprocess.run(
        ["node", str(node_producer), redis_url, queue, PROJECT, *seeded, missing],
        check=True,
        timeout=60,
    )
    samples = worker.wait_for_deletions(1201, timeout=120)
    assert by_label(samples, "vbs_deleter_deletions_total", "outcome") == {
        "accepted": 1200,
        "already_gone": 1,
    }
    assert by_label(samples, "vbs_deleter_rejected_tasks_total", "reason") == {}
    assert sim.stats()["accepted"] == 1200
    assert "request_id=celery-node-test" in worker.log()
