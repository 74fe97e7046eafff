"""Key management: create, change, enable/disable, list, show and delete keys (`/api/keys`)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from daemon.errors import Invalid
from daemon.http.answers import key_fields, key_object
from daemon.http.routes import ServiceDep
from daemon.http.schemas import ERROR_RESPONSES, KeyRef, KeySettings, NewKey, key_changes

router = APIRouter(responses=ERROR_RESPONSES)
# With a fleet database: change this server alone (README "Keys created once").
Local = Annotated[bool, Query(description="this server alone, not the fleet database")]
NOTHING_TO_CHANGE = (
    "nothing to change: send data_limit_bytes, expire_at, reset_strategy, note or enabled"
)


@router.post("/api/keys", status_code=201)
async def create_key(
    body: Annotated[NewKey, Body()], service: ServiceDep, local: Local = False
) -> dict[str, Any]:
    port_range = service.port_range()
    if body.port is not None and body.port not in port_range:
        raise Invalid(f"port {body.port} is outside the range {port_range}")
    settings = key_changes(body, service.timezone(), creating=True)
    created = await service.create_key(body.name, body.port, settings, local=local)
    return key_object(created, service)


@router.patch("/api/keys/{key_id}")
async def update_key(
    key_id: KeyRef, body: Annotated[KeySettings, Body()], service: ServiceDep, local: Local = False
) -> dict[str, Any]:
    service.find(key_id)
    changes = key_changes(body, service.timezone(), creating=False)
    if not changes:
        raise Invalid(NOTHING_TO_CHANGE)
    return key_object(await service.update_key(key_id, changes, local=local), service)


@router.post("/api/keys/{key_id}/disable")
async def disable_key(key_id: KeyRef, service: ServiceDep, local: Local = False) -> dict[str, Any]:
    return key_object(await service.update_key(key_id, {"enabled": False}, local=local), service)


@router.post("/api/keys/{key_id}/enable")
async def enable_key(key_id: KeyRef, service: ServiceDep, local: Local = False) -> dict[str, Any]:
    return key_object(await service.update_key(key_id, {"enabled": True}, local=local), service)


@router.get("/api/keys")
async def list_keys(service: ServiceDep) -> dict[str, Any]:
    await service.refresh()
    keys = service.keys_by_port()
    return {
        "keys": [key_object(k, service) for k in keys],
        "total": len(keys),
        "timestamp": int(time.time()),
    }


@router.get("/api/keys/{key_id}")
async def show_key(key_id: KeyRef, service: ServiceDep) -> dict[str, Any]:
    (key,) = await service.refresh_keys([key_id])
    fleet = service.fleet_keys
    servers = None if fleet is None else await fleet.servers_of(key)
    return {
        **key_object(key, service),
        "servers": servers,
        "client_ips": await service.client_ips(key),
    }


@router.delete("/api/keys/{key_id}")
async def delete_key(key_id: KeyRef, service: ServiceDep, local: Local = False) -> dict[str, Any]:
    return {**key_fields(await service.delete_key(key_id, local=local)), "link": None}
