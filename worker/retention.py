"""Retention policies and the pure planner that decides which listed backups to delete, and why not others.

A policy (one ``[policies.NAME]`` table of the ``VBS_RETENTION_FILE`` TOML) selects backups of one project
by status, name glob and volume, keeps those younger than ``keep_days`` and the ``keep_newest`` newest
``available`` ones of each volume, and deletes at most ``max_deletions`` per run, oldest first.

Incremental chains: a backup the listing shows with ``has_dependent_backups: true`` is never deleted in
this run. When every backup that may depend on it (the newer incremental members of its chain, in the
same volume up to the next full backup) is a candidate too, it is skipped as ``waiting_for_dependants``
and goes in a later run, once the listing no longer shows dependants; otherwise ``has_dependants``.
So a chain goes newest first, one member per run, and a batch never holds a parent and its child.

Everything here is pure: the listing comes in as plain dicts (vendor fields, see vbs-api.md section 4).
"""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from worker.contract import is_project_id
from worker.schedule import Cron, Schedule, parse_interval

DELETABLE = frozenset({"available", "error"})
POLICY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# bounded labels of vbs_deleter_retention_skipped_total
SKIP_REASONS = ("keep_newest", "has_dependants", "waiting_for_dependants", "cap", "unparseable")


class PolicyError(ValueError):
    """The retention file is unreadable or a policy in it is invalid; the message names the policy."""


class Policy(BaseModel):
    """One retention policy. Days are 24-hour periods of UTC time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    project_id: str = Field(description="project whose backups the policy cleans (32 hex characters)")
    keep_days: float = Field(ge=0, description="backups younger than this many days are kept")
    statuses: frozenset[str] = Field(DELETABLE, description="statuses that may be deleted")
    include_names: tuple[str, ...] = Field(("*",), description="name globs a backup must match (any)")
    exclude_names: tuple[str, ...] = Field((), description="name globs that protect a backup")
    include_volumes: tuple[str, ...] = Field((), description="volume ID globs; empty means every volume")
    exclude_volumes: tuple[str, ...] = Field((), description="volume ID globs whose backups are kept")
    keep_newest: int = Field(0, ge=0, description="newest available backups kept per volume")
    max_deletions: int = Field(1000, ge=1, description="cap on deletions enqueued per run")
    every: str | float | None = Field(None, description="interval between runs: 90, '15m', '6h', '1d'")
    cron: str | None = Field(None, description="five-field cron expression in UTC")

    @field_validator("project_id")
    @classmethod
    def _project(cls, value: str) -> str:
        if not is_project_id(value):
            raise ValueError("must be 32 hex characters")
        return value.lower()

    @field_validator("statuses")
    @classmethod
    def _deletable(cls, value: frozenset[str]) -> frozenset[str]:
        if not value or not value <= DELETABLE:
            raise ValueError(f"must be a non-empty subset of {sorted(DELETABLE)} (only those can be deleted)")
        return value

    @model_validator(mode="after")
    def _one_schedule(self) -> Policy:
        if (self.every is None) == (self.cron is None):
            raise ValueError("give exactly one of every (interval) or cron")
        self.schedule()  # raises ValueError on a bad expression
        return self

    def schedule(self) -> Schedule:
        """The parsed ``every`` or ``cron``."""
        if self.cron is not None:
            return Schedule(cron=Cron.parse(self.cron))
        assert self.every is not None
        return Schedule(interval=parse_interval(self.every))

    def selects(self, name: str, volume_id: str, status: str) -> bool:
        """True when status, name and volume put the backup in this policy's scope (age aside)."""
        return (
            status in self.statuses
            and any(fnmatchcase(name, glob) for glob in self.include_names)
            and not any(fnmatchcase(name, glob) for glob in self.exclude_names)
            and (not self.include_volumes or any(fnmatchcase(volume_id, g) for g in self.include_volumes))
            and not any(fnmatchcase(volume_id, glob) for glob in self.exclude_volumes)
        )


def load_policies(path: Path) -> dict[str, Policy]:
    """Every ``[policies.NAME]`` table of the TOML file at ``path``; :class:`PolicyError` on any fault."""
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise PolicyError(f"VBS_RETENTION_FILE: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"VBS_RETENTION_FILE: {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"policies"})
    if unknown:
        raise PolicyError(f"{path}: unknown top-level keys {unknown}; policies go in [policies.NAME]")
    tables = document.get("policies", {})
    policies: dict[str, Policy] = {}
    for name, table in tables.items():
        if not POLICY_NAME.fullmatch(name):
            raise PolicyError(f"{path}: policy name {name!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        if not isinstance(table, dict):
            raise PolicyError(f"{path}: policies.{name} must be a table")
        try:
            policies[name] = Policy(**table)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc']) or 'policy'}: {error['msg']}"
                for error in exc.errors()
            )
            raise PolicyError(f"{path}: policies.{name}: {problems}") from None
    return policies


@dataclass(frozen=True, slots=True)
class Backup:
    """The fields of a listed backup the planner uses; ``created_at`` is aware UTC."""

    id: str
    name: str
    status: str
    volume_id: str
    created_at: datetime
    has_dependants: bool
    incremental: bool


def parse_backup(raw: object) -> Backup | None:
    """A listed backup, or None when a field the rules need is missing or malformed (never deleted)."""
    if not isinstance(raw, dict):
        return None
    try:
        created = datetime.fromisoformat(raw["created_at"])
    except (KeyError, TypeError, ValueError):
        return None
    created = created.replace(tzinfo=UTC) if created.tzinfo is None else created.astimezone(UTC)
    strings = [raw.get(key) for key in ("id", "name", "status", "volume_id")]
    flags = [raw.get(key) for key in ("has_dependent_backups", "is_incremental")]
    if not all(isinstance(value, str) for value in strings) or not all(isinstance(f, bool) for f in flags):
        return None
    backup_id, name, status, volume_id = (str(value) for value in strings)
    return Backup(backup_id, name, status, volume_id, created, bool(flags[0]), bool(flags[1]))


@dataclass(frozen=True, slots=True)
class Decision:
    """What the plan does with one candidate: ``delete`` (reason ``expired``) or ``skip`` (a SKIP_REASON)."""

    backup_id: str
    name: str
    volume_id: str
    status: str
    age_days: float | None
    action: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """A policy's decisions over one complete listing. Candidates = deletions + skipped, always."""

    policy: str
    project_id: str
    listed: int
    decisions: tuple[Decision, ...]

    @property
    def deletions(self) -> list[str]:
        """Backup IDs to delete in this run, oldest first; none depends on another."""
        return [d.backup_id for d in self.decisions if d.action == "delete"]

    @property
    def skipped(self) -> Counter[str]:
        """Skipped candidates by reason."""
        return Counter(d.reason for d in self.decisions if d.action == "skip")

    def as_json(self) -> dict[str, Any]:
        """The plan as a JSON-ready document (``retention plan --json``)."""
        return {
            "policy": self.policy,
            "project_id": self.project_id,
            "listed": self.listed,
            "candidates": len(self.decisions),
            "deletions": len(self.deletions),
            "skipped": dict(sorted(self.skipped.items())),
            "decisions": [
                {
                    "backup_id": d.backup_id,
                    "name": d.name,
                    "volume_id": d.volume_id,
                    "status": d.status,
                    "age_days": None if d.age_days is None else round(d.age_days, 3),
                    "action": d.action,
                    "reason": d.reason,
                }
                for d in self.decisions
            ],
        }


def _chain_successors(backups: list[Backup]) -> dict[str, list[str]]:
    """For each backup, the newer incremental members of its chain (same volume, up to the next full)."""
    by_volume: dict[str, list[Backup]] = {}
    for backup in backups:
        by_volume.setdefault(backup.volume_id, []).append(backup)
    successors: dict[str, list[str]] = {}
    for members in by_volume.values():
        members.sort(key=lambda b: (b.created_at, b.id))
        for i, backup in enumerate(members):
            later: list[str] = []
            for newer in members[i + 1 :]:
                if not newer.incremental:
                    break
                later.append(newer.id)
            successors[backup.id] = later
    return successors


def _kept_newest(policy: Policy, backups: list[Backup]) -> set[str]:
    """IDs of the ``keep_newest`` newest available backups of each volume that the name rules select."""
    if not policy.keep_newest:
        return set()
    by_volume: dict[str, list[Backup]] = {}
    for b in backups:
        if b.status == "available" and policy.selects(b.name, b.volume_id, "available"):
            by_volume.setdefault(b.volume_id, []).append(b)
    kept: set[str] = set()
    for members in by_volume.values():
        members.sort(key=lambda b: (b.created_at, b.id), reverse=True)
        kept.update(b.id for b in members[: policy.keep_newest])
    return kept


def plan(name: str, policy: Policy, listing: list[Any], now: datetime) -> Plan:
    """Decide over a complete listing of ``policy.project_id`` at ``now`` (aware UTC)."""
    parsed: list[Backup] = []
    decisions: list[Decision] = []
    for raw in listing:
        backup = parse_backup(raw)
        if backup is None:
            shown = raw.get("id") if isinstance(raw, dict) else None
            backup_id = shown if isinstance(shown, str) else "?"
            decisions.append(Decision(backup_id, "?", "?", "?", None, "skip", "unparseable"))
        else:
            parsed.append(backup)
    kept = _kept_newest(policy, parsed)
    successors = _chain_successors(parsed)

    def age(backup: Backup) -> float:
        return (now - backup.created_at).total_seconds() / 86400

    expired = [
        b for b in parsed if policy.selects(b.name, b.volume_id, b.status) and age(b) >= policy.keep_days
    ]
    expired.sort(key=lambda b: (b.created_at, b.id))
    candidate_ids = {b.id for b in expired}
    deletable: list[Backup] = []
    for backup in expired:
        if backup.id in kept:
            reason = "keep_newest"
        elif backup.has_dependants:
            later = successors[backup.id]
            waiting = bool(later) and all(i in candidate_ids and i not in kept for i in later)
            reason = "waiting_for_dependants" if waiting else "has_dependants"
        else:
            deletable.append(backup)
            continue
        decisions.append(_decision(backup, age(backup), "skip", reason))
    chosen = deletable[: policy.max_deletions]
    capped = deletable[policy.max_deletions :]
    ordered = (
        [_decision(b, age(b), "delete", "expired") for b in chosen]
        + [_decision(b, age(b), "skip", "cap") for b in capped]
        + decisions
    )
    return Plan(name, policy.project_id, len(listing), tuple(ordered))


def _decision(backup: Backup, age_days: float, action: str, reason: str) -> Decision:
    return Decision(backup.id, backup.name, backup.volume_id, backup.status, age_days, action, reason)


def table(plan: Plan) -> str:
    """The plan as a text table with a summary line (``retention plan``)."""
    row = "{:<7} {:<23} {:>7}  {:<9} {:<36}  {:<36}  {}".format
    lines = [row("action", "reason", "age_d", "status", "backup_id", "volume_id", "name")]
    for d in plan.decisions:
        age = "?" if d.age_days is None else f"{d.age_days:.1f}"
        lines.append(row(d.action, d.reason, age, d.status, d.backup_id, d.volume_id, d.name))
    skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(plan.skipped.items())) or "none"
    lines.append(
        f"policy {plan.policy} (project {plan.project_id}): listed {plan.listed}, "
        f"candidates {len(plan.decisions)}, delete {len(plan.deletions)}, skipped: {skipped}"
    )
    return "\n".join(lines)
