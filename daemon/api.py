"""HTTP/JSON API on the Unix socket. Thin: parse, call the service, shape the answer.

Paths and field names follow the seed document (`/api/system/ports`, `/api/traffic/ports/exact`,
`rx_bytes`, `total_formatted`, ...) so existing bots keep working; key management adds
`/api/keys`. Every error is JSON `{"detail": "..."}` with a 4xx status.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import structlog
from fastapi import Body, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon import allocator, bounds, limits, metrics, names, netinfo, usage_api, web, xray_sync
from daemon.errors import Invalid, NotFound, OperationError, XrayRefused
from daemon.limits import ResetStrategy, Status
from daemon.service import Service
from daemon.state import KeyRecord, now
from daemon.units import human_bytes
from daemon.xray_sync import XrayError

T = TypeVar("T")
PAGE_READ_LIMIT = 256  # up to this many keys, reading each key's counters beats one full reading
KeyRef = Annotated[
    str,
    PathParam(min_length=1, max_length=bounds.MAX_REF_CHARS, description="key id, uuid or name"),
]


def _limit_bytes(value: Any) -> int:
    """data_limit_bytes as sent: a JSON integer or a size such as "50GB", within the bounds of
    README "Bounds and names". `true` is no number here, though Python counts bools as ints."""
    try:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError("must be a whole number of bytes or a size such as 50GB")
        return limits.parse_limit(value) if isinstance(value, str) else bounds.limit_bytes(value)
    except ValueError as exc:
        raise PydanticCustomError("data_limit_bytes", str(exc)) from None


def _key_name(value: str) -> str:
    """A new key's name in its kept form, or 422 saying which rule of daemon.names it breaks."""
    try:
        return names.validate(value)
    except names.NameRefused as exc:
        raise PydanticCustomError("name", str(exc)) from None


LimitBytes = Annotated[
    int,
    PlainValidator(_limit_bytes),
    WithJsonSchema({
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": bounds.MAX_LIMIT_BYTES},
            {"type": "string", "maxLength": bounds.MAX_SIZE_CHARS},
        ],
        "description": "bytes, or e.g. 50GB / 50GiB; at most 1 EB (10^18 bytes)",
    }),
]
NAME_SCHEMA: dict[str, Any] = {
    "type": "string", "minLength": 1, "maxLength": bounds.MAX_NAME_CHARS, "description": names.RULE
}
Moment = Annotated[str, Field(max_length=bounds.MAX_MOMENT_CHARS)]
Port = Annotated[StrictInt, Field(ge=bounds.MIN_PORT, le=bounds.MAX_PORT)]


class KeySettings(BaseModel):
    """Limits and lifecycle, as sent by clients: sizes as bytes or "50GB", dates as ISO or "+30d".
    Types are strict: a boolean is `true`/`false`, a number is a JSON number."""

    model_config = ConfigDict(extra="forbid")
    data_limit_bytes: LimitBytes | None = None
    expire_at: Moment | None = Field(
        default=None, description="ISO 8601 date/time, or +30d; 2000-01-01 to 9998-12-31"
    )
    reset_strategy: ResetStrategy | None = None
    note: str | None = Field(default=None, max_length=bounds.MAX_NOTE_CHARS)
    enabled: StrictBool | None = None


class ErrorAnswer(BaseModel):
    """Every error: one readable sentence."""

    detail: str


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorAnswer, "description": text}
    for status, text in (
        (400, "malformed request body"),
        (401, "missing or wrong X-API-Key (TCP listener)"),
        (404, "no such key or route"),
        (409, "name or port taken, range full"),
        (413, "request body too large"),
        (422, "invalid field"),
        (503, "nftables or Xray refused; nothing was changed"),
        (507, "the state could not be written; nothing was changed"),
    )
}


class Migration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config_path: str = Field(min_length=1, max_length=4096, pattern=r"^/[^\x00]*$")
    dry_run: StrictBool = False


class NewKey(KeySettings):
    name: Annotated[str, AfterValidator(_key_name), WithJsonSchema(NAME_SCHEMA)]
    port: Port | None = None


def key_settings(body: KeySettings, service: Service, creating: bool) -> dict[str, Any]:
    """The fields the client sent, parsed and checked: raises Invalid with a readable reason."""
    sent = body.model_fields_set - {"name", "port"}
    changes: dict[str, Any] = {}
    for name in sent:
        value = getattr(body, name)
        if value is None and name in ("reset_strategy", "note", "enabled"):
            raise Invalid(f"{name}: may not be null")
        changes[name] = value
    if changes.get("expire_at") is not None:
        moment = _moment(changes["expire_at"], service)
        if creating and moment <= now():
            raise Invalid(f"expire_at: {moment.isoformat()} is in the past")
        changes["expire_at"] = moment
    return changes


def _moment(value: str, service: Service) -> datetime:
    try:
        return limits.parse_moment(value, now(), service.zone)
    except ValueError as exc:
        raise Invalid(f"expire_at: {exc}") from None


def key_object(key: KeyRecord, service: Service) -> dict[str, Any]:
    return {
        **_key_fields(key),
        "link": _link(key, service),
        "subscription_url": f"/sub/{key.sub_token}" if key.sub_token else None,
        "error": service.failures.get(key.id),  # this key's failed kernel step, if any
    }


def _link(key: KeyRecord, service: Service) -> str | None:
    if service.xray is None:
        return None
    try:
        return service.xray.link(service.state, key)
    except XrayError:
        return None


def _key_fields(key: KeyRecord) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "uuid": str(key.uuid),
        "port": key.port,
        "created_at": key.created_at.isoformat(),
        "is_active": key.status is Status.ACTIVE,
        "status": key.status.value,
        "enabled": key.enabled,
        "note": key.note,
        "data_limit_bytes": key.data_limit_bytes,
        "used_bytes": key.used_bytes,
        "dropped_bytes": key.dropped.bytes,
        "expire_at": _iso(key.expire_at),
        "reset_strategy": key.reset_strategy.value,
        "next_reset_at": _iso(key.next_reset_at),
        "last_reset_at": _iso(key.last_reset_at),
        "used_before_reset": key.used_before_reset,
        "rx_bytes": key.rx.bytes,
        "tx_bytes": key.tx.bytes,
        "total_bytes": key.used_bytes,
    }


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def traffic_object(key: KeyRecord, connections: int, timestamp: int) -> dict[str, Any]:
    total = key.rx.bytes + key.tx.bytes
    return {
        "key_id": key.id,
        "name": key.name,
        "port": key.port,
        "uuid": str(key.uuid),
        "connections": connections,
        "rx_bytes": key.rx.bytes,
        "tx_bytes": key.tx.bytes,
        "total_bytes": total,
        "rx_packets": key.rx.packets,
        "tx_packets": key.tx.packets,
        "rx_formatted": human_bytes(key.rx.bytes),
        "tx_formatted": human_bytes(key.tx.bytes),
        "total_formatted": human_bytes(total),
        "dropped_bytes": key.dropped.bytes,
        "used_bytes": key.used_bytes,
        "data_limit_bytes": key.data_limit_bytes,
        "status": key.status.value,
        "last_reset_at": _iso(key.last_reset_at),
        "timestamp": timestamp,
    }


def interface_summary() -> tuple[dict[str, dict[str, int]], int]:
    interfaces = netinfo.interface_bytes()
    total = sum(i["rx_bytes"] + i["tx_bytes"] for i in interfaces.values())
    return interfaces, total


@dataclass
class HostFacts:
    """Established connections per port and interface counters, for the traffic answers."""

    connections: dict[int, int] = field(default_factory=dict)
    interfaces: dict[str, dict[str, int]] = field(default_factory=dict)
    interface_total: int = 0

    async def gather(self, service: Service) -> None:
        """Both at once: counting connections walks the kernel's whole TCP table (~8 ms here)."""
        async with anyio.create_task_group() as group:
            group.start_soon(self._connections, service)
            group.start_soon(self._interfaces)

    async def _connections(self, service: Service) -> None:
        self.connections = await service.connections()

    async def _interfaces(self) -> None:
        self.interfaces, self.interface_total = await anyio.to_thread.run_sync(interface_summary)


async def read_with_host_facts(service: Service, reading: Awaitable[T]) -> tuple[T, HostFacts]:
    """`reading` (of counters) while the host facts are gathered alongside; its refusal is raised
    as itself, not inside a task group's exception group."""
    facts = HostFacts()
    refused: OperationError | None = None
    async with anyio.create_task_group() as group:
        group.start_soon(facts.gather, service)
        try:
            result = await reading
        except OperationError as exc:
            refused = exc
            group.cancel_scope.cancel()
    if refused is not None:
        raise refused
    return result, facts


MAX_BODY = 64 * 1024
MAX_DEPTH = 16


class JsonBodies:
    """Every request body is JSON (so `curl -d '{"name": "alice"}'` works without -H), at most
    MAX_BODY bytes and MAX_DEPTH levels deep: larger or deeper bodies are refused before parsing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY:
                await _refuse(send, 413, f"request body larger than {MAX_BODY} bytes")
                return
        if json_depth(body) > MAX_DEPTH:
            await _refuse(send, 400, f"request body nested deeper than {MAX_DEPTH} levels")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def json_depth(body: bytes) -> int:
    """How deeply brackets nest in a JSON text, ignoring brackets inside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for char in body.decode("utf-8", errors="replace"):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


async def _refuse(send: Send, status: int, detail: str) -> None:
    await JSONResponse({"detail": detail}, status_code=status)({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(service: Service) -> FastAPI:
    app = FastAPI(
        title="portmeter",
        summary="Exact per-key traffic accounting for Xray servers",
        docs_url=None,
        redoc_url=None,
        responses=ERROR_RESPONSES,
        redirect_slashes=False,  # a redirect would echo the client's Host header
    )
    log = service.log
    app.add_middleware(JsonBodies)
    _install_error_handlers(app, log)
    web.register(app)
    metrics.register(app, service)
    if service.history is not None:
        usage_api.register(app, service, service.history)

    @app.post("/api/keys", status_code=201)
    async def create_key(body: Annotated[NewKey, Body()]) -> dict[str, Any]:
        port_range = service.settings.port_range
        if body.port is not None and body.port not in port_range:
            raise Invalid(f"port {body.port} is outside the range {port_range}")
        settings = key_settings(body, service, creating=True)
        return key_object(await service.create_key(body.name, body.port, settings), service)

    @app.patch("/api/keys/{key_id}")
    async def update_key(key_id: KeyRef, body: Annotated[KeySettings, Body()]) -> dict[str, Any]:
        service.find(key_id)
        changes = key_settings(body, service, creating=False)
        if not changes:
            raise Invalid("nothing to change: send data_limit_bytes, expire_at, reset_strategy, note or enabled")
        return key_object(await service.update_key(key_id, changes), service)

    @app.post("/api/keys/{key_id}/disable")
    async def disable_key(key_id: KeyRef) -> dict[str, Any]:
        return key_object(await service.update_key(key_id, {"enabled": False}), service)

    @app.post("/api/keys/{key_id}/enable")
    async def enable_key(key_id: KeyRef) -> dict[str, Any]:
        return key_object(await service.update_key(key_id, {"enabled": True}), service)

    @app.get("/api/keys")
    async def list_keys() -> dict[str, Any]:
        await service.refresh()
        keys = sorted(service.state.keys.values(), key=lambda k: k.port)
        return {"keys": [key_object(k, service) for k in keys], "total": len(keys), "timestamp": int(time.time())}

    @app.get("/api/keys/{key_id}")
    async def show_key(key_id: KeyRef) -> dict[str, Any]:
        (key,) = await service.refresh_keys([key_id])
        return key_object(key, service)

    @app.delete("/api/keys/{key_id}")
    async def delete_key(key_id: KeyRef) -> dict[str, Any]:
        return {**_key_fields(await service.delete_key(key_id)), "link": None}

    @app.get("/api/system/ports")
    async def ports() -> dict[str, Any]:
        assignments = service.assigned_ports()
        port_range = service.settings.port_range
        return {
            "port_assignments": {
                "used_ports": {str(port): key_id for key_id, port in sorted(assignments.items())},
                "port_assignments": assignments,
            },
            "used_ports": len(assignments),
            "available_ports": allocator.available(port_range, assignments.values()),
            "max_ports": port_range.size,
            "port_range": str(port_range),
            "timestamp": int(time.time()),
        }

    @app.post("/api/system/ports/reset")
    async def ports_reset() -> dict[str, Any]:
        before = await service.check()
        result = await service.reconcile()
        after = await service.check()
        log.info("ports_reconciled", problems_before=len(before), problems_after=len(after))
        return {
            "table_rebuilt": result.table_rebuilt,
            "installed_ports": result.installed,
            "removed_ports": result.removed,
            "problems_before": before,
            "problems_after": after,
            "timestamp": int(time.time()),
        }

    @app.get("/api/system/ports/status")
    async def ports_status() -> dict[str, Any]:
        problems = await service.check()
        return {
            "valid": not problems,
            "problems": problems,
            "total_keys": len(service.state.keys),
            "port_range": str(service.settings.port_range),
            "nft_table": f"inet {service.settings.nft_table}",
            "timestamp": int(time.time()),
        }

    @app.get("/api/traffic/ports/exact")
    async def all_traffic(
        limit: Annotated[
            int | None, Query(ge=1, le=bounds.MAX_PAGE_LIMIT, description="keys per page, by port")
        ] = None,
        offset: Annotated[
            int, Query(ge=0, le=bounds.MAX_OFFSET, description="keys to skip, by port")
        ] = 0,
    ) -> dict[str, Any]:
        """Every key's traffic, or one page of it (`limit`, `offset`; ordered by port). A page
        reads only its own keys' counters; the whole list reads the whole table."""
        ordered = sorted(service.state.keys.values(), key=lambda k: k.port)
        page = ordered[offset : None if limit is None else offset + limit]

        async def read_page() -> list[KeyRecord]:
            if len(page) <= PAGE_READ_LIMIT:
                return await service.refresh_keys([k.id for k in page], skip_missing=True)
            await service.refresh()
            return [k for k in page if k.id in service.state.keys]

        keys, facts = await read_with_host_facts(service, read_page())
        connections, interfaces, interface_total = facts.connections, facts.interfaces, facts.interface_total
        now = int(time.time())
        per_key = {
            str(k.uuid): {
                "port": k.port,
                "key_id": k.id,
                "key_name": k.name,
                "traffic": traffic_object(k, connections.get(k.port, 0), now),
                "error": service.failures.get(k.id),  # this key's failed kernel step, if any
            }
            for k in keys
        }
        return {
            "ports_traffic": {
                "total_ports": len(keys),
                "total_keys": len(ordered),
                "offset": offset,
                "limit": limit,
                "ports_traffic": per_key,
                "total_traffic": sum(k.rx.bytes + k.tx.bytes for k in keys),
                "total_connections": sum(connections.get(k.port, 0) for k in keys),
            },
            "system_summary": {
                "total_system_traffic": interface_total,
                "active_ports": sum(1 for k in keys if connections.get(k.port, 0)),
                "interface_summary": interfaces,
            },
            "source": "nftables",
            "timestamp": now,
        }

    @app.get("/api/keys/{key_id}/traffic/port/exact")
    async def key_traffic(key_id: KeyRef) -> dict[str, Any]:
        (key,), facts = await read_with_host_facts(service, service.refresh_keys([key_id]))
        result = traffic_object(key, facts.connections.get(key.port, 0), int(time.time()))
        result["error"] = service.failures.get(key.id)  # this key's failed kernel step, if any
        result["interface_traffic"] = facts.interfaces
        result["total_interface_traffic"] = facts.interface_total
        return result

    @app.post("/api/keys/{key_id}/traffic/port/reset")
    async def reset_key_traffic(key_id: KeyRef) -> dict[str, Any]:
        key = await service.reset_traffic(key_id)
        return traffic_object(key, 0, int(time.time()))

    @app.get("/api/keys/{key_id}/link")
    async def key_link(key_id: KeyRef) -> dict[str, Any]:
        key = service.find(key_id)
        if service.xray is None:
            raise Invalid("the Xray integration is off (PORTMETER_XRAY_CONFIG is empty): no links")
        return {
            "key_id": key.id,
            "name": key.name,
            "link": service.xray.link(service.state, key),
            "subscription_url": f"/sub/{key.sub_token}",
        }

    @app.get("/sub/{token}", response_class=PlainTextResponse)
    async def subscription(token: Annotated[str, PathParam(max_length=64)]) -> PlainTextResponse:
        for key in service.state.keys.values():
            if key.sub_token and hmac.compare_digest(key.sub_token.encode(), token.encode()):
                if service.xray is None or key.status is not Status.ACTIVE:
                    return PlainTextResponse(xray_sync.subscription([]))
                link = service.xray.link(service.state, key)
                return PlainTextResponse(xray_sync.subscription([link]))
        raise NotFound("no such subscription")

    @app.get("/api/system/xray/config-status")
    async def xray_status() -> dict[str, Any]:
        if service.xray is None:
            return {"enabled": False, "timestamp": int(time.time())}
        return {"enabled": True, **await service.xray.status(service.state), "timestamp": int(time.time())}

    @app.post("/api/system/xray/sync-config")
    async def xray_sync_config() -> dict[str, Any]:
        pushed = await service.sync_xray(force_restart=False)
        return {
            "synced": True,
            "added_inbounds": list(pushed.added),
            "removed_inbounds": list(pushed.removed),
            "apply_mode": service.settings.xray_apply,
            "apply_seconds": round(pushed.apply_seconds, 3),
            "backup": pushed.backup,
            "timestamp": int(time.time()),
        }

    @app.get("/api/system/xray/validate-sync")
    async def xray_validate() -> dict[str, Any]:
        if service.xray is None:
            raise Invalid("the Xray integration is off (PORTMETER_XRAY_CONFIG is empty)")
        try:
            problems = await service.xray.drift(service.state)
        except XrayError as exc:
            raise XrayRefused(str(exc)) from None
        return {
            "in_sync": not problems,
            "problems": [
                {"kind": p.kind, "message": p.message, "key_id": p.key_id, "port": p.port} for p in problems
            ],
            "expected_inbounds": len(service.xray.served(service.state)),
            "remove_inactive": service.settings.xray_remove_inactive,
            "timestamp": int(time.time()),
        }

    @app.post("/api/system/xray/migrate")
    async def xray_migrate(body: Annotated[Migration, Body()]) -> dict[str, Any]:
        path = Path(body.config_path)
        if not path.is_absolute():
            raise Invalid("config_path: must be an absolute path")
        plan, created = await service.migrate(path, body.dry_run)
        return {
            "dry_run": body.dry_run,
            "plan": plan,
            "created": [key_object(k, service) for k in created],
            "timestamp": int(time.time()),
        }

    @app.post("/api/system/xray/migrate/rollback")
    async def xray_migrate_rollback() -> dict[str, Any]:
        restored, removed = await service.rollback_migration()
        return {
            "restored_from": restored,
            "removed_keys": [k.name for k in removed],
            "timestamp": int(time.time()),
        }

    @app.get("/api/system/traffic/summary")
    async def traffic_summary() -> dict[str, Any]:
        await service.refresh()
        interfaces, interface_total = await anyio.to_thread.run_sync(interface_summary)
        keys = service.state.keys.values()
        rx = sum(k.rx.bytes for k in keys)
        tx = sum(k.tx.bytes for k in keys)
        return {
            "keys": len(keys),
            "rx_bytes": rx,
            "tx_bytes": tx,
            "total_bytes": rx + tx,
            "total_formatted": human_bytes(rx + tx),
            "interface_summary": interfaces,
            "total_interface_traffic": interface_total,
            "last_poll": None if service.last_poll_at is None else int(service.last_poll_at),
            "timestamp": int(time.time()),
        }

    return app


def _install_error_handlers(app: FastAPI, log: structlog.typing.FilteringBoundLogger) -> None:
    @app.exception_handler(OperationError)
    async def operation_error(_: Request, exc: OperationError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"detail": "request body is not valid JSON"}, status_code=400)
        return JSONResponse({"detail": describe_errors(errors)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("request_failed", path=request.url.path, error=repr(exc), exc_info=exc)
        return JSONResponse({"detail": "internal error; see the daemon log"}, status_code=500)


# Types are strict (README "Bounds and names"): say what was expected, in JSON's words.
STRICT_TYPES = {
    "bool_type": "must be true or false (a JSON boolean)",
    "int_type": "must be a whole number (a JSON number without quotes)",
}


def describe_errors(errors: Any) -> str:
    """Pydantic's error list as one readable line: `body.name: String should match ...`."""
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") == "missing" and where == "body":
            message = "a JSON body is required"
        elif error.get("type") in STRICT_TYPES:
            message = STRICT_TYPES[error["type"]]
        parts.append(f"{where}: {message}")
    return "; ".join(parts)

