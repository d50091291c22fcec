"""A one-line progress bar for terminals (the demo and ``vbs-deleter submit``)."""

from __future__ import annotations

import time
from typing import TextIO


def draw(stream: TextIO, done: float, count: int, started: float, unit: str = "/s") -> None:
    """Redraw ``[####....] done/count rate`` in place; ``started`` is a time.monotonic() value."""
    width = 40
    filled = int(width * done / count) if count else width
    rate = done / max(time.monotonic() - started, 1e-9)
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {int(done)}/{count}  {rate:7.1f}{unit}")
    stream.flush()
