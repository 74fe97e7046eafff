"""Usage per user across servers (the paths panels such as Marzban call): local keys plus what
other servers reported.

A user is a key name here, and the `user_token` of fleet reports. bytes_uploaded is client ->
server (a key's rx), bytes_downloaded server -> client (tx). Local totals are the key's current
totals (since its last reset) read from the kernel at request time; reported totals are the sums
of the reports received since the user's last reset. Local history (series, last used) comes
from daemon.store.history; other servers' usage from a `Reported` store: the same history, or
the fleet database when PORTMETER_FLEET_DSN is set (README "A fleet in PostgreSQL"). Thin,
like the other routes: validate, call, shape; errors are JSON {"detail"} 4xx.

Authentication: on the Unix socket, its file permissions are the authentication; on the TCP
listener every route needs an API key, and a report key opens the webhook alone
(daemon.http.middleware.auth).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, Depends, Query

from daemon import bounds, names
from daemon.errors import Invalid, NotFound, StorageFull, StoreUnavailable
from daemon.http.answers import key_fields
from daemon.http.routes import HistoryDep, ReportedDep, ServiceDep
from daemon.http.schemas import ERROR_RESPONSES, Text, Username, parse_reports
from daemon.service import Established, Service
from daemon.store.history import History, ReportRefused, ServerUsage, days_back, hours_back
from daemon.store.reported import Reported, ReportedDetail
from daemon.store.state import KeyRecord, now
from daemon.store.usage import SinkError
from daemon.units import human_bytes, iso

HOURS = 24  # hourly series of the detailed view
DAYS = 30  # daily series of the detailed view
Points = dict[datetime, tuple[int, int]]  # (up, down) per hour or day

router = APIRouter(responses=ERROR_RESPONSES)


@contextlib.contextmanager
def storage() -> Iterator[None]:
    """Store failures as answers: 507 only for a full disk, 503 otherwise (the fleet database
    unusable: daemon/fleet/reads.py), 422 for a report past its bound."""
    try:
        yield
    except SinkError as exc:
        raise (StorageFull if exc.disk_full else StoreUnavailable)(str(exc)) from None
    except ReportRefused as exc:
        raise Invalid(str(exc)) from None


def _sums(up: int, down: int) -> dict[str, Any]:
    return {
        "bytes_uploaded": up,
        "bytes_downloaded": down,
        "total_bytes": up + down,
        "total_formatted": human_bytes(up + down),
    }


def _series(starts: list[datetime], found: Points) -> list[dict[str, Any]]:
    """One point per hour/day in `starts`, zeros where nothing was used."""
    return [{"start": start.isoformat(), **_sums(*found.get(start, (0, 0)))} for start in starts]


def _add(points: Points, into: Points) -> None:
    """Sum `points` into `into`, hour by hour (or day by day)."""
    for start, (up, down) in points.items():
        have = into.get(start, (0, 0))
        into[start] = (have[0] + up, have[1] + down)


def _reported_entry(usage: ServerUsage) -> dict[str, Any]:
    """What another server reported for a user."""
    return {
        "server": usage.server,
        "source": "report",
        "port": usage.port,
        "protocol": usage.protocol,
        **_sums(usage.bytes_uploaded, usage.bytes_downloaded),
        "reports": usage.reports,
        "connections": None,
        "connections_at": None,
        "last_used": iso(usage.last_seen),
        "first_seen": iso(usage.first_seen),
        "status": None,
        "data_limit_bytes": None,
    }


@dataclass(frozen=True)
class Users:
    """Users as the answers see them: local keys (the service, their history) and other
    servers' usage (`reported`), with this server's name in usage answers."""

    service: Service
    history: History
    reported: Reported
    server: str

    async def local_keys(self, username: str, *, save: bool = False) -> list[KeyRecord]:
        """The user's keys here (by port), only their counters read now: the cost does not grow
        with the number of keys. `save`: what moved is saved, so the history holds it too."""
        ids = [k.id for k in self.service.keys_named(username)]
        if not ids:
            return []
        return await self.service.refresh_keys(ids, skip_missing=True, save=save)

    async def lookup(self, username: str) -> tuple[list[KeyRecord], list[ServerUsage]]:
        """The user's keys here (by port) and reports from elsewhere; 404 if neither exists."""
        keys = await self.local_keys(username)
        with storage():
            reported = await self.reported.reported(username)
        known(username, keys, reported)
        return keys, reported

    def server_count(self, keys: list[KeyRecord], reported: list[ServerUsage]) -> int:
        return len(({self.server} if keys else set()) | {r.server for r in reported})

    def local_entry(self, key: KeyRecord, connections: Established) -> dict[str, Any]:
        """One of the user's keys here."""
        limit = key.data_limit_bytes
        with storage():
            last_used = self.history.last_used(key.id)
        return {
            "server": self.server,
            "source": "local",
            "key_id": key.id,
            "name": key.name,
            "port": key.port,
            "protocol": "vless",
            **_sums(key.rx.bytes, key.tx.bytes),
            "connections": connections.count(key.port),
            "connections_at": connections.stamp(),
            "last_used": iso(last_used),
            "status": key.status.value,
            "data_limit_bytes": limit,
            "used_bytes": key.used_bytes,
            "limit_used_percent": None if not limit else round(100 * key.used_bytes / limit, 2),
            "epoch": key.epoch,
            "last_reset_at": iso(key.last_reset_at),
        }


def known(username: str, keys: list[KeyRecord], reported: list[ServerUsage]) -> None:
    """404 for a user with neither a key here nor usage reported from elsewhere."""
    if not keys and not reported:
        raise NotFound(f"no key named {username!r} and no reports for user {username!r}")


async def users_of(service: ServiceDep, history: HistoryDep, reported: ReportedDep) -> Users:
    return Users(service, history, reported, service.server_label())


UsersDep = Annotated[Users, Depends(users_of)]


@dataclass(frozen=True)
class Window:
    """The hours and days the detailed view shows, up to the current hour."""

    hours: list[datetime]
    days: list[datetime]
    until: datetime

    @classmethod
    def ending(cls, moment: datetime) -> Window:
        return cls(hours_back(moment, HOURS), days_back(moment, DAYS), moment + timedelta(hours=1))

    def entry(
        self, base: dict[str, Any], hourly: Points, daily: Points, totals: tuple[Points, Points]
    ) -> dict[str, Any]:
        """`base` with its series; the series are added to `totals` (hourly, daily)."""
        _add(hourly, totals[0])
        _add(daily, totals[1])
        return {**base, "hourly": _series(self.hours, hourly), "daily": _series(self.days, daily)}


def _local_series(
    users: Users,
    window: Window,
    key: KeyRecord,
    connections: Established,
    totals: tuple[Points, Points],
) -> dict[str, Any]:
    history, until = users.history, window.until
    hourly = {
        b.start: (b.rx_bytes, b.tx_bytes) for b in history.hourly(key.id, window.hours[0], until)
    }
    daily = {
        b.start: (b.rx_bytes, b.tx_bytes) for b in history.daily(key.id, window.days[0], until)
    }
    return window.entry(users.local_entry(key, connections), hourly, daily, totals)


def _reported_series(
    window: Window, detail: ReportedDetail, usage: ServerUsage, totals: tuple[Points, Points]
) -> dict[str, Any]:
    hourly, daily = (
        {b.start: (b.bytes_uploaded, b.bytes_downloaded) for b in series.get(usage.server, [])}
        for series in (detail.hourly, detail.daily)
    )
    return window.entry(_reported_entry(usage), hourly, daily, totals)


@router.get("/api/admin/usage/{username}")
async def user_usage(username: Username, service: ServiceDep, users: UsersDep) -> dict[str, Any]:
    keys, reported = await users.lookup(username)
    connections = await service.connections()
    local_up = sum(k.rx.bytes for k in keys)
    local_down = sum(k.tx.bytes for k in keys)
    up = local_up + sum(r.bytes_uploaded for r in reported)
    down = local_down + sum(r.bytes_downloaded for r in reported)
    return {
        "username": username,
        **_sums(up, down),
        "servers": users.server_count(keys, reported),
        "local": None
        if not keys
        else {
            "server": users.server,
            **_sums(local_up, local_down),
            "keys": [users.local_entry(k, connections) for k in keys],
        },
        "reported": [_reported_entry(r) for r in reported],
        "timestamp": int(time.time()),
    }


@router.get("/api/admin/usage/{username}/detailed")
async def user_usage_detailed(
    username: Username, service: ServiceDep, users: UsersDep
) -> dict[str, Any]:
    # Saved once read, so the history (series, last used) holds every byte counted so far.
    keys = await users.local_keys(username, save=True)
    window = Window.ending(now())
    with storage():
        detail = await users.reported.reported_detail(
            username, window.hours[0], window.days[0], window.until
        )
    reported = detail.usage
    known(username, keys, reported)
    connections = await service.connections()
    totals: tuple[Points, Points] = ({}, {})
    with storage():
        servers = [_local_series(users, window, k, connections, totals) for k in keys]
    servers += [_reported_series(window, detail, usage, totals) for usage in reported]
    up = sum(s["bytes_uploaded"] for s in servers)
    down = sum(s["bytes_downloaded"] for s in servers)
    return {
        "username": username,
        **_sums(up, down),
        "server_count": users.server_count(keys, reported),
        "connections": connections.total(k.port for k in keys),
        "connections_at": connections.stamp(),
        "servers": servers,
        "hourly": _series(window.hours, totals[0]),
        "daily": _series(window.days, totals[1]),
        "reports_reset_at": iso(detail.reset_at),
        "timestamp": int(time.time()),
    }


@router.post("/api/admin/usage/reset/{username}")
async def user_usage_reset(
    username: Username, service: ServiceDep, users: UsersDep
) -> dict[str, Any]:
    keys, _ = await users.lookup(username)
    # The user's keys and their usage elsewhere: one operation, one fleet message.
    local = [
        {
            "key_id": done.id,
            "port": done.port,
            "used_before_reset": done.used_before_reset,
            "epoch": done.epoch,
        }
        for done in await service.reset_many([k.id for k in keys], [username])
    ]
    with storage():
        reported = await users.reported.reset_reports(username)
    return {
        "username": username,
        "local": local,
        "reported": reported,
        "history_kept": True,
        "timestamp": int(time.time()),
    }


@router.post("/api/admin/usage/reset")
async def usage_reset_all(service: ServiceDep, reported: ReportedDep) -> dict[str, Any]:
    """Every user: local counters and reported totals to zero; the history is kept."""
    keys = service.keys_by_port()
    with storage():
        reported_users = await reported.reported_users()
    # Every key and every user reported from elsewhere: one operation, one fleet message.
    await service.reset_many([k.id for k in keys], sorted(reported_users))
    with storage():
        await reported.reset_many(sorted(reported_users))
    users = sorted({k.name for k in keys} | set(reported_users))
    return {
        "users_reset": users,
        "keys_reset": len(keys),
        "history_kept": True,
        "timestamp": int(time.time()),
    }


Reports = dict[str, tuple[int, int, list[str]]]  # per user: up, down, servers


def _per_user(
    keys: Iterable[KeyRecord], server: str, reported: Reports, page: UserPage
) -> tuple[list[dict[str, Any]], int, int]:
    """The page's users, by name: totals (local keys and reports) and on how many servers; how
    many users matched, and how many there are. Only the page's entries are built: at 30,000
    users, building all of them cost more than the rest of the answer."""
    local: dict[str, tuple[int, int]] = {}
    for key in keys:
        up, down = local.get(key.name, (0, 0))
        local[key.name] = (up + key.rx.bytes, down + key.tx.bytes)
    everyone = sorted(local.keys() | reported.keys())
    listed, matched = page.select(everyone)
    entries = [_user_entry(name, local.get(name), reported.get(name), server) for name in listed]
    return entries, matched, len(everyone)


def _user_entry(
    name: str, here: tuple[int, int] | None, there: tuple[int, int, list[str]] | None, server: str
) -> dict[str, Any]:
    up, down = here or (0, 0)
    servers = {server} if here else set()
    if there is not None:
        up, down = up + there[0], down + there[1]
        servers.update(there[2])
    return {"username": name, **_sums(up, down), "servers": len(servers)}


def _database(database: dict[str, Any], server: str, reported_servers: list[str]) -> dict[str, Any]:
    """The history's own figures; this server counts among its servers once it holds any."""
    local_has_history = database["hourly_records"] + database["daily_records"] > 0
    return {
        "records": database["records"],
        "hourly_records": database["hourly_records"],
        "daily_records": database["daily_records"],
        "report_records": database["report_records"],
        "unique_users": database["unique_users"],
        "unique_servers": database["unique_servers"]
        + (1 if local_has_history and server not in reported_servers else 0),
        "size_bytes": database["size_bytes"],
        "size_formatted": human_bytes(database["size_bytes"]),
        "retention_days": database["retention_days"],
        "hourly_hours": database["hourly_hours"],
        "oldest": iso(database["oldest"]),
        "newest": iso(database["newest"]),
    }


@dataclass(frozen=True)
class UserPage:
    """Which users the overview lists: those whose name contains `search` (compared as names
    are: letter case and normal form aside), `limit` of them from `offset`, by name; all without
    a limit. A page's users carry their key here (`key`), so the page at `/` needs one request
    per page however many keys there are."""

    limit: int | None
    offset: int
    search: str | None

    def select(self, users: list[str]) -> tuple[list[str], int]:
        """The page of `users` (names, sorted) and how many matched the search."""
        if self.search is not None:
            wanted = names.fold(self.search)
            users = [u for u in users if wanted in names.fold(u)]
        end = None if self.limit is None else self.offset + self.limit
        return users[self.offset : end], len(users)


async def user_page(
    limit: Annotated[
        int | None, Query(ge=1, le=bounds.MAX_PAGE_LIMIT, description="users per page, by name")
    ] = None,
    offset: Annotated[
        int, Query(ge=0, le=bounds.MAX_USER_OFFSET, description="users to skip, by name")
    ] = 0,
    search: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=bounds.MAX_SEARCH_CHARS,
            pattern=Text,
            description="only users whose name contains this, in any letter case",
        ),
    ] = None,
) -> UserPage:
    return UserPage(limit, offset, search)


def _with_keys(
    page: list[dict[str, Any]], keys: list[KeyRecord], connections: Established
) -> list[dict[str, Any]]:
    """The page's users, each with its key here (`key`: its fields and connections) or null."""
    local = {k.name: k for k in keys}
    return [{**user, "key": _key_entry(local.get(user["username"]), connections)} for user in page]


def _key_entry(key: KeyRecord | None, connections: Established) -> dict[str, Any] | None:
    return None if key is None else {**key_fields(key), "connections": connections.count(key.port)}


@router.get("/api/admin/usage")
async def usage_overview(
    service: ServiceDep, users: UsersDep, page: Annotated[UserPage, Depends(user_page)]
) -> dict[str, Any]:
    await service.refresh()
    connections = await service.connections()
    keys = service.keys_by_port()
    with storage():
        reported_users = await users.reported.reported_users()
        reported = await users.reported.reported_stats()
        database = users.history.stats()
    local_up = sum(k.rx.bytes for k in keys)
    local_down = sum(k.tx.bytes for k in keys)
    up, down = local_up + reported["bytes_uploaded"], local_down + reported["bytes_downloaded"]
    listed, matched, total = _per_user(keys, users.server, reported_users, page)
    if page.limit is not None:
        listed = _with_keys(listed, keys, connections)
    return {
        "total_users": total,
        "total_servers": len({users.server, *reported["servers"]}),
        "traffic_used": up + down,
        "traffic_used_formatted": human_bytes(up + down),
        "bytes_uploaded": up,
        "bytes_downloaded": down,
        "total_connections": connections.total(k.port for k in keys),
        "connections_at": connections.stamp(),
        "local": {
            "server": users.server,
            "keys": len(keys),
            **_sums(local_up, local_down),
        },
        "reported": {
            "servers": reported["servers"],
            "users": reported["unique_users"],
            "reports": reported["records"],
            **_sums(reported["bytes_uploaded"], reported["bytes_downloaded"]),
        },
        "users": listed,
        "database": _database(database, users.server, reported["servers"]),
        "timestamp": int(time.time()),
        "users_matched": matched,
        "offset": page.offset,
        "limit": page.limit,
    }


@router.post("/api/admin/usage/cleanup")
async def usage_cleanup(history: HistoryDep) -> dict[str, Any]:
    with storage():
        counts = await anyio.to_thread.run_sync(history.cleanup)
        database = history.stats()
    removed = sum(n for name, n in counts.items() if name.endswith("_deleted"))
    return {
        **counts,
        "removed": removed,
        "retention_days": history.retention_days,
        "records": database["records"],
        "size_bytes": database["size_bytes"],
        "timestamp": int(time.time()),
    }


@router.post("/api/traffic/webhook")
async def traffic_webhook(
    body: Annotated[Any, Body()], service: ServiceDep, reported: ReportedDep
) -> dict[str, Any]:
    return await _intake(body, service, reported)


@router.post("/api/xpert/traffic-webhook")
async def xpert_traffic_webhook(
    body: Annotated[Any, Body()], service: ServiceDep, reported: ReportedDep
) -> dict[str, Any]:
    """Seed 004's path for servers that already speak its format: the same body, the same
    report-id dedupe, the same store as /api/traffic/webhook."""
    return await _intake(body, service, reported)


async def _intake(body: Any, service: Service, reported: Reported) -> dict[str, Any]:
    reports = parse_reports(body, service.own_server_names())
    with storage():
        fresh = await reported.record_reports([r.fleet_report() for r in reports])
    return {
        "received": len(reports),
        "accepted": sum(fresh),
        "duplicates": len(fresh) - sum(fresh),
        "duplicate_ids": [r.report_id for r, new in zip(reports, fresh, strict=True) if not new],
        "timestamp": int(time.time()),
    }
