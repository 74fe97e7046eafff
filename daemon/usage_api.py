"""Usage per user across servers (seed 004's paths): local keys plus what other servers reported.

A user is a key name here, and the `user_token` of fleet reports. bytes_uploaded is client ->
server (a key's rx), bytes_downloaded server -> client (tx). Local totals are the key's current
totals (since its last reset) read from the kernel at request time; reported totals are the sums
of the reports received since the user's last reset. History (series, last used) comes from
daemon.history. Thin, like daemon.api: validate, call, shape; errors are JSON {"detail"} 4xx.

Authentication: on the Unix socket, its file permissions are the authentication; the TCP
listener, when it comes, requires an API key for every route.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from fastapi import Body, FastAPI
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from daemon.bounds import MAX_REPORT_BYTES
from daemon.errors import Invalid, NotFound, StorageFull, StoreUnavailable
from daemon.history import (
    FleetReport,
    History,
    ReportRefused,
    ServerUsage,
    days_back,
    hours_back,
)
from daemon.state import KeyRecord, now
from daemon.units import human_bytes
from daemon.usage import SinkError

if TYPE_CHECKING:
    from daemon.service import Service

HOURS = 24  # hourly series of the detailed view
DAYS = 30  # daily series of the detailed view
MAX_BATCH = 65536  # a sender's batch holds one report per key that moved: up to a whole port range
FUTURE_SLACK = timedelta(days=1)  # reports from servers whose clock runs ahead are still taken
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)

Username = Annotated[
    str, PathParam(min_length=1, max_length=128, description="key name / user_token of reports")
]
Text = r"^[^\x00-\x1f\x7f]+$"  # printable: no control characters
Bytes = Annotated[StrictInt, Field(ge=0, le=MAX_REPORT_BYTES)]


class Report(BaseModel):
    """One usage report from a server: seed 004's webhook fields, a report id and a time.
    Each direction carries at most MAX_REPORT_BYTES; an unknown field is refused."""

    model_config = ConfigDict(extra="forbid")
    report_id: Annotated[str, StringConstraints(min_length=1, max_length=512, pattern=Text)]
    user_token: Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=Text)]
    server: Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=Text)]
    port: Annotated[StrictInt, Field(ge=1, le=65535)]
    protocol: Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.+-]+$")]
    bytes_uploaded: Bytes
    bytes_downloaded: Bytes
    timestamp: datetime | None = Field(default=None, description="Unix seconds or ISO 8601; default: now")

    @field_validator("server")
    @classmethod
    def _another_server(cls, value: str, info: ValidationInfo) -> str:
        """This server's usage is counted here, by the kernel: a report under its name (given
        as the context's `own_servers`, case-folded) would add to the local keys' users."""
        if value.casefold() in (info.context or {}).get("own_servers", ()):
            raise ValueError("is this server's own name; a report may only carry another server's usage")
        return value

    @field_validator("timestamp")
    @classmethod
    def _plausible(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        if value < EARLIEST:
            raise ValueError("is before 2000-01-01")
        if value > now() + FUTURE_SLACK:
            raise ValueError("is more than a day in the future")
        return value

    def fleet_report(self) -> FleetReport:
        return FleetReport(
            self.report_id, self.user_token, self.server, self.port, self.protocol,
            self.bytes_uploaded, self.bytes_downloaded, self.timestamp,
        )


class ReportBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reports: list[Report] = Field(min_length=1, max_length=MAX_BATCH)


def parse_reports(body: Any, own_servers: frozenset[str] = frozenset()) -> list[Report]:
    """A single report object or {"reports": [...]}, none from a server named in `own_servers`
    (case-folded); raises RequestValidationError (422)."""
    context = {"own_servers": own_servers}
    try:
        if isinstance(body, dict) and "reports" in body:
            return ReportBatch.model_validate(body, context=context).reports
        if not isinstance(body, dict):
            raise RequestValidationError([{
                "loc": ("body",), "type": "model_type",
                "msg": 'must be a report object or {"reports": [...]}',
            }])
        return [Report.model_validate(body, context=context)]
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        ) from None


@contextlib.contextmanager
def _storage() -> Iterator[None]:
    """History failures as answers: 507 only for a full disk, 503 otherwise, 422 for a report
    past its bound."""
    try:
        yield
    except SinkError as exc:
        raise (StorageFull if exc.disk_full else StoreUnavailable)(str(exc)) from None
    except ReportRefused as exc:
        raise Invalid(str(exc)) from None


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _sums(up: int, down: int) -> dict[str, Any]:
    return {
        "bytes_uploaded": up,
        "bytes_downloaded": down,
        "total_bytes": up + down,
        "total_formatted": human_bytes(up + down),
    }


def _series(starts: list[datetime], found: dict[datetime, tuple[int, int]]) -> list[dict[str, Any]]:
    """One point per hour/day in `starts`, zeros where nothing was used."""
    return [
        {"start": start.isoformat(), **_sums(*found.get(start, (0, 0)))} for start in starts
    ]


def server_label(settings: Any) -> str:
    """This server's name in usage answers: PORTMETER_SERVER_NAME when set (the name its fleet
    reports carry), else PORTMETER_PUBLIC_HOST, else the host name."""
    explicit = "server_name" in settings.model_fields_set
    name = getattr(settings, "server_name", "")
    return (name if explicit else "") or settings.public_host or name or socket.gethostname()


def register(app: FastAPI, service: Service, history: History) -> None:
    """Add the usage routes and the fleet-report webhook to `app`."""
    local_server = server_label(service.settings)
    own_names = frozenset({local_server.casefold(), service.settings.server_name.casefold()})

    def local_keys(username: str) -> list[KeyRecord]:
        return sorted(
            (k for k in service.state.keys.values() if k.name == username), key=lambda k: k.port
        )

    def lookup(username: str) -> tuple[list[KeyRecord], list[ServerUsage]]:
        keys = local_keys(username)
        with _storage():
            reported = history.reported(username)
        if not keys and not reported:
            raise NotFound(f"no key named {username!r} and no reports for user {username!r}")
        return keys, reported

    def server_count(keys: list[KeyRecord], reported: list[ServerUsage]) -> int:
        return len(({local_server} if keys else set()) | {r.server for r in reported})

    def local_entry(key: KeyRecord, connections: dict[int, int]) -> dict[str, Any]:
        limit = key.data_limit_bytes
        with _storage():
            last_used = history.last_used(key.id)
        return {
            "server": local_server,
            "source": "local",
            "key_id": key.id,
            "name": key.name,
            "port": key.port,
            "protocol": "vless",
            **_sums(key.rx.bytes, key.tx.bytes),
            "connections": connections.get(key.port, 0),
            "last_used": _iso(last_used),
            "status": key.status.value,
            "data_limit_bytes": limit,
            "used_bytes": key.used_bytes,
            "limit_used_percent": None if not limit else round(100 * key.used_bytes / limit, 2),
            "epoch": key.epoch,
            "last_reset_at": _iso(key.last_reset_at),
        }

    def reported_entry(usage: ServerUsage) -> dict[str, Any]:
        return {
            "server": usage.server,
            "source": "report",
            "port": usage.port,
            "protocol": usage.protocol,
            **_sums(usage.bytes_uploaded, usage.bytes_downloaded),
            "reports": usage.reports,
            "connections": None,
            "last_used": _iso(usage.last_seen),
            "first_seen": _iso(usage.first_seen),
            "status": None,
            "data_limit_bytes": None,
        }

    @app.get("/api/admin/usage/{username}")
    async def user_usage(username: Username) -> dict[str, Any]:
        await service.refresh()
        keys, reported = lookup(username)
        connections = await service.connections() if keys else {}
        local_up = sum(k.rx.bytes for k in keys)
        local_down = sum(k.tx.bytes for k in keys)
        up = local_up + sum(r.bytes_uploaded for r in reported)
        down = local_down + sum(r.bytes_downloaded for r in reported)
        return {
            "username": username,
            **_sums(up, down),
            "servers": server_count(keys, reported),
            "local": None if not keys else {
                "server": local_server,
                **_sums(local_up, local_down),
                "keys": [local_entry(k, connections) for k in keys],
            },
            "reported": [reported_entry(r) for r in reported],
            "timestamp": int(time.time()),
        }

    @app.get("/api/admin/usage/{username}/detailed")
    async def user_usage_detailed(username: Username) -> dict[str, Any]:
        # poll_once also saves, so the history (series, last used) holds every byte counted so far.
        await service.poll_once()
        keys, reported = lookup(username)
        connections = await service.connections() if keys else {}
        moment = now()
        hours, days = hours_back(moment, HOURS), days_back(moment, DAYS)
        until = moment + timedelta(hours=1)
        total_hours: dict[datetime, tuple[int, int]] = {}
        total_days: dict[datetime, tuple[int, int]] = {}

        def collect(points: dict[datetime, tuple[int, int]], into: dict[datetime, tuple[int, int]]) -> None:
            for start, (up, down) in points.items():
                have = into.get(start, (0, 0))
                into[start] = (have[0] + up, have[1] + down)

        servers = []
        with _storage():
            for key in keys:
                hourly = {b.start: (b.rx_bytes, b.tx_bytes) for b in history.hourly(key.id, hours[0], until)}
                daily = {b.start: (b.rx_bytes, b.tx_bytes) for b in history.daily(key.id, days[0], until)}
                collect(hourly, total_hours)
                collect(daily, total_days)
                servers.append({
                    **local_entry(key, connections),
                    "hourly": _series(hours, hourly),
                    "daily": _series(days, daily),
                })
            for usage in reported:
                hourly = {
                    b.start: (b.bytes_uploaded, b.bytes_downloaded)
                    for b in history.reported_hourly(username, hours[0], until, usage.server)
                }
                daily = {
                    b.start: (b.bytes_uploaded, b.bytes_downloaded)
                    for b in history.reported_daily(username, days[0], until, usage.server)
                }
                collect(hourly, total_hours)
                collect(daily, total_days)
                servers.append({
                    **reported_entry(usage),
                    "hourly": _series(hours, hourly),
                    "daily": _series(days, daily),
                })
            reports_reset_at = history.reports_reset_at(username)
        up = sum(s["bytes_uploaded"] for s in servers)
        down = sum(s["bytes_downloaded"] for s in servers)
        return {
            "username": username,
            **_sums(up, down),
            "server_count": server_count(keys, reported),
            "connections": sum(connections.get(k.port, 0) for k in keys),
            "servers": servers,
            "hourly": _series(hours, total_hours),
            "daily": _series(days, total_days),
            "reports_reset_at": _iso(reports_reset_at),
            "timestamp": int(time.time()),
        }

    @app.post("/api/admin/usage/reset/{username}")
    async def user_usage_reset(username: Username) -> dict[str, Any]:
        keys, _ = lookup(username)
        local = []
        for key in keys:
            done = await service.reset_traffic(key.id)
            local.append({
                "key_id": done.id,
                "port": done.port,
                "used_before_reset": done.used_before_reset,
                "epoch": done.epoch,
            })
        with _storage():
            reported = history.reset_reports(username)
        return {
            "username": username,
            "local": local,
            "reported": reported,
            "history_kept": True,
            "timestamp": int(time.time()),
        }

    @app.post("/api/admin/usage/reset")
    async def usage_reset_all() -> dict[str, Any]:
        """Every user: local counters and reported totals to zero; the history is kept."""
        keys = sorted(service.state.keys.values(), key=lambda k: k.port)
        for key in keys:
            await service.reset_traffic(key.id)
        with _storage():
            reported_users = history.reported_users()
            for name in reported_users:
                history.reset_reports(name)
        users = sorted({k.name for k in keys} | set(reported_users))
        return {
            "users_reset": users,
            "keys_reset": len(keys),
            "history_kept": True,
            "timestamp": int(time.time()),
        }

    @app.get("/api/admin/usage")
    async def usage_overview() -> dict[str, Any]:
        await service.refresh()
        connections = await service.connections()
        keys = list(service.state.keys.values())
        with _storage():
            reported_users = history.reported_users()
            reported = history.reported_stats()
            database = history.stats()
        users: dict[str, dict[str, Any]] = {}
        for key in keys:
            entry = users.setdefault(key.name, {"up": 0, "down": 0, "servers": set()})
            entry["up"] += key.rx.bytes
            entry["down"] += key.tx.bytes
            entry["servers"].add(local_server)
        for name, (up, down, servers) in reported_users.items():
            entry = users.setdefault(name, {"up": 0, "down": 0, "servers": set()})
            entry["up"] += up
            entry["down"] += down
            entry["servers"].update(servers)
        local_up = sum(k.rx.bytes for k in keys)
        local_down = sum(k.tx.bytes for k in keys)
        up, down = local_up + reported["bytes_uploaded"], local_down + reported["bytes_downloaded"]
        all_servers = {local_server, *reported["servers"]}
        local_has_history = database["hourly_records"] + database["daily_records"] > 0
        return {
            "total_users": len(users),
            "total_servers": len(all_servers),
            "traffic_used": up + down,
            "traffic_used_formatted": human_bytes(up + down),
            "bytes_uploaded": up,
            "bytes_downloaded": down,
            "total_connections": sum(connections.get(k.port, 0) for k in keys),
            "local": {
                "server": local_server,
                "keys": len(keys),
                **_sums(local_up, local_down),
            },
            "reported": {
                "servers": reported["servers"],
                "users": reported["unique_users"],
                "reports": reported["records"],
                **_sums(reported["bytes_uploaded"], reported["bytes_downloaded"]),
            },
            "users": [
                {"username": name, **_sums(e["up"], e["down"]), "servers": len(e["servers"])}
                for name, e in sorted(users.items())
            ],
            "database": {
                "records": database["records"],
                "hourly_records": database["hourly_records"],
                "daily_records": database["daily_records"],
                "report_records": database["report_records"],
                "unique_users": database["unique_users"],
                "unique_servers": database["unique_servers"] + (
                    1 if local_has_history and local_server not in reported["servers"] else 0
                ),
                "size_bytes": database["size_bytes"],
                "size_formatted": human_bytes(database["size_bytes"]),
                "retention_days": database["retention_days"],
                "hourly_hours": database["hourly_hours"],
                "oldest": _iso(database["oldest"]),
                "newest": _iso(database["newest"]),
            },
            "timestamp": int(time.time()),
        }

    @app.post("/api/admin/usage/cleanup")
    async def usage_cleanup() -> dict[str, Any]:
        with _storage():
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

    @app.post("/api/traffic/webhook")
    async def traffic_webhook(body: Annotated[Any, Body()]) -> dict[str, Any]:
        reports = parse_reports(body, own_names)
        with _storage():
            fresh = history.record_reports(r.fleet_report() for r in reports)
        return {
            "received": len(reports),
            "accepted": sum(fresh),
            "duplicates": len(fresh) - sum(fresh),
            "duplicate_ids": [r.report_id for r, new in zip(reports, fresh, strict=True) if not new],
            "timestamp": int(time.time()),
        }
