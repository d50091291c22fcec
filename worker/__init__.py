"""vbs-deleter: an async bulk deletion worker for VBS backups.

``celery -A worker worker`` finds the Celery app as ``worker.app``; it is loaded on first access so that
importing a submodule (the simulator, the CLI) does not read settings or connect to anything.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from worker.tasks import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
