"""Key management: create, change, enable/disable, list, show and delete keys (`/api/keys`)."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from daemon.bounds import BATCH_PATH
from daemon.errors import Invalid
from daemon.http.answers import key_fields, key_object
from daemon.http.keyfields import KeySettings, NewKey, NewKeys
from daemon.http.routes import ServiceDep
from daemon.http.routes.traffic import read_page
from daemon.http.schemas import ERROR_RESPONSES, KeyRef, PageLimit, PageOffset, key_changes
from daemon.service import KeySpec, Service

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
    spec = new_key_spec(body, service)
    created = await service.create_key(spec.name, spec.port, dict(spec.settings), local=local)
    return key_object(created, service)


@router.post(BATCH_PATH, status_code=201)
async def create_keys(
    body: Annotated[NewKeys, Body()], service: ServiceDep, local: Local = False
) -> dict[str, Any]:
    """Up to MAX_BATCH_KEYS keys, all or nothing (README "Batch create"); a refusal names the
    first item at fault as `keys[i]`."""
    specs = []
    for at, item in enumerate(body.keys):
        try:
            specs.append(new_key_spec(item, service))
        except Invalid as exc:
            raise Invalid(f"keys[{at}]: {exc.detail}") from None
    created = await service.create_many(specs, local=local)
    return {"keys": [key_object(key, service) for key in created]}


def new_key_spec(body: NewKey, service: Service) -> KeySpec:
    """A new key as sent, checked (port in the range, dates read in the service's zone)."""
    port_range = service.port_range()
    if body.port is not None and body.port not in port_range:
        raise Invalid(f"port {body.port} is outside the range {port_range}")
    settings = key_changes(body, service.timezone(), creating=True)
    return KeySpec(body.name, body.port, settings)


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
async def list_keys(
    service: ServiceDep, limit: PageLimit = None, offset: PageOffset = 0
) -> dict[str, Any]:
    """Every key, or one page of them (`limit`, `offset`; ordered by port) with only the page's
    counters read; `total` counts every key."""
    keys = await read_page(service, service.keys_by_port(offset, limit))
    return {
        "keys": [key_object(k, service) for k in keys],
        "total": service.key_count(),
        "timestamp": int(time.time()),
        "offset": offset,
        "limit": limit,
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
