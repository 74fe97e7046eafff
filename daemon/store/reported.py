"""What the usage answers need about other servers, whichever store holds it.

Without a fleet database the reports other servers POSTed live in the SQLite history
(`HistoryReports`); with PORTMETER_FLEET_DSN they live in PostgreSQL (daemon/fleet/reads.py).
Both satisfy `Reported`, so daemon/http/routes/usage.py shapes one answer from either. This
server's own usage never comes from here: it is read live from the kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from daemon.store.history import FleetReport, History, ReportBucket, ServerUsage

UserTotals = dict[str, tuple[int, int, list[str]]]  # name -> (uploaded, downloaded, servers)


@dataclass(frozen=True)
class ReportedDetail:
    """A user's usage on the other servers with its series (per server) and the moment of the
    user's last reset: what the detailed usage answer needs, read at once."""

    usage: list[ServerUsage]
    hourly: dict[str, list[ReportBucket]]
    daily: dict[str, list[ReportBucket]]
    reset_at: datetime | None


class Reported(Protocol):
    """Other servers' usage per user: totals since the user's last reset, series, intake."""

    async def reported(self, user: str) -> list[ServerUsage]: ...

    async def reported_users(self) -> UserTotals: ...

    async def reported_detail(
        self, user: str, hours_since: datetime, days_since: datetime, until: datetime
    ) -> ReportedDetail:
        """Totals and series from `hours_since` (hourly) and `days_since` (daily) to `until`."""
        ...

    async def reported_stats(self) -> dict[str, Any]: ...

    async def reset_reports(self, user: str) -> dict[str, Any]: ...

    async def reset_many(self, users: Sequence[str]) -> None:
        """Reset every one of `users`, whose names the service's reset announced with its keys
        (`Service.reset_many`)."""
        ...

    async def record_reports(self, reports: Sequence[FleetReport]) -> list[bool]: ...


class HistoryReports:
    """`Reported` on the SQLite history (the default, embedded store)."""

    def __init__(self, history: History) -> None:
        self.history = history

    async def reported(self, user: str) -> list[ServerUsage]:
        return self.history.reported(user)

    async def reported_users(self) -> UserTotals:
        return self.history.reported_users()

    async def reported_detail(
        self, user: str, hours_since: datetime, days_since: datetime, until: datetime
    ) -> ReportedDetail:
        history = self.history
        usage = history.reported(user)
        servers = [u.server for u in usage]
        return ReportedDetail(
            usage,
            {s: history.reported_hourly(user, hours_since, until, s) for s in servers},
            {s: history.reported_daily(user, days_since, until, s) for s in servers},
            history.reports_reset_at(user),
        )

    async def reported_stats(self) -> dict[str, Any]:
        return self.history.reported_stats()

    async def reset_reports(self, user: str) -> dict[str, Any]:
        return self.history.reset_reports(user)

    async def reset_many(self, users: Sequence[str]) -> None:
        for user in users:
            self.history.reset_reports(user)

    async def record_reports(self, reports: Sequence[FleetReport]) -> list[bool]:
        return self.history.record_reports(reports)
