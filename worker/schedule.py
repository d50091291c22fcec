"""When a retention policy runs: a fixed interval or a five-field cron expression, in UTC (pure).

``every = "6h"`` (units s, m, h, d; a bare number is seconds) or ``cron = "30 2 * * *"`` (minute, hour,
day of month, month, day of week with 0 or 7 = Sunday; ``*``, lists, ranges and ``/step``). As in Vixie
cron, when both day fields are restricted a day matching either one is due.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_INTERVAL = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
# (low, high) per cron field: minute, hour, day of month, month, day of week
_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def parse_interval(text: str | float) -> float:
    """Seconds of an interval such as ``90``, ``"15m"`` or ``"1d"``; ValueError unless > 0."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _INTERVAL.fullmatch(str(text).strip())
        if match is None:
            raise ValueError(f"interval {text!r} is not a number with an optional unit s, m, h or d")
        seconds = float(match[1]) * _UNITS[match[2] or "s"]
    if seconds <= 0:
        raise ValueError(f"interval {text!r} must be longer than 0 seconds")
    return seconds


def _field(text: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*":
            start, stop = low, high
        elif "-" in base:
            start, stop = (int(x) for x in base.split("-", 1))
        else:
            start = int(base)
            stop = high if step_text else start
        if not (low <= start <= stop <= high) or step < 1:
            raise ValueError(f"cron field {text!r} is outside {low}-{high}")
        values.update(range(start, stop + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    """A parsed cron expression; :meth:`next_after` gives the first due minute after a moment."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_restricted: bool
    weekdays_restricted: bool

    @classmethod
    def parse(cls, text: str) -> Cron:
        """ValueError naming the problem for anything but five valid fields."""
        parts = text.split()
        if len(parts) != 5:
            raise ValueError(f"cron {text!r} must have 5 fields: minute hour day month weekday")
        try:
            fields = [_field(part, *bounds) for part, bounds in zip(parts, _RANGES, strict=True)]
        except ValueError as exc:
            raise ValueError(f"cron {text!r}: {exc}") from None
        minutes, hours, days, months, weekdays = fields
        return cls(
            minutes=minutes,
            hours=hours,
            days=days,
            months=months,
            weekdays=frozenset(day % 7 for day in weekdays),
            days_restricted=parts[2] != "*",
            weekdays_restricted=parts[4] != "*",
        )

    def _day_matches(self, moment: datetime) -> bool:
        day_ok = moment.day in self.days
        weekday_ok = (moment.isoweekday() % 7) in self.weekdays
        if self.days_restricted and self.weekdays_restricted:
            return day_ok or weekday_ok
        return day_ok and weekday_ok

    def next_after(self, moment: datetime) -> datetime:
        """The first matching minute strictly after ``moment`` (same tzinfo); within 5 years or ValueError."""
        current = moment.replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = moment + timedelta(days=366 * 5)
        while current < limit:
            if current.month not in self.months:
                first = current.replace(day=1, hour=0, minute=0)
                current = (first + timedelta(days=32)).replace(day=1)
            elif not self._day_matches(current):
                current = current.replace(hour=0, minute=0) + timedelta(days=1)
            elif current.hour not in self.hours:
                current = current.replace(minute=0) + timedelta(hours=1)
            elif current.minute not in self.minutes:
                current += timedelta(minutes=1)
            else:
                return current
        raise ValueError("the cron expression never matches")


@dataclass(frozen=True)
class Schedule:
    """Either ``interval`` seconds after the last run, or the next ``cron`` match."""

    interval: float | None = None
    cron: Cron | None = None

    def next_run(self, now: datetime, last_run: datetime | None) -> datetime:
        """When to run next: an interval policy never run before is due ``now``."""
        if self.cron is not None:
            return self.cron.next_after(now)
        assert self.interval is not None
        return now if last_run is None else max(now, last_run + timedelta(seconds=self.interval))
