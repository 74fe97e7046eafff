"""Xray's config as portmeter keeps it: its status, a forced sync, the drift check, and the
migration of an existing config to one inbound per key (`/api/system/xray/...`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body

from daemon.errors import Invalid, XrayRefused
from daemon.http.answers import key_object
from daemon.http.routes import ServiceDep
from daemon.http.schemas import ERROR_RESPONSES, Migration
from daemon.xray.model import XrayError

router = APIRouter(responses=ERROR_RESPONSES)


@router.get("/api/system/xray/config-status")
async def xray_status(service: ServiceDep) -> dict[str, Any]:
    status = await service.xray_status()
    if status is None:
        return {"enabled": False, "timestamp": int(time.time())}
    return {"enabled": True, **status, "timestamp": int(time.time())}


@router.post("/api/system/xray/sync-config")
async def xray_sync_config(service: ServiceDep) -> dict[str, Any]:
    pushed = await service.sync_xray(force_restart=False)
    return {
        "synced": True,
        "added_inbounds": list(pushed.added),
        "removed_inbounds": list(pushed.removed),
        "apply_mode": service.xray_apply_mode(),
        "apply_seconds": round(pushed.apply_seconds, 3),
        "backup": pushed.backup,
        "timestamp": int(time.time()),
    }


@router.get("/api/system/xray/validate-sync")
async def xray_validate(service: ServiceDep) -> dict[str, Any]:
    if not service.xray_enabled():
        raise Invalid("the Xray integration is off (PORTMETER_XRAY_CONFIG is empty)")
    try:
        problems = await service.xray_drift()
    except XrayError as exc:
        raise XrayRefused(str(exc)) from None
    return {
        "in_sync": not problems,
        "problems": [
            {"kind": p.kind, "message": p.message, "key_id": p.key_id, "port": p.port}
            for p in problems
        ],
        "expected_inbounds": service.xray_expected_inbounds(),
        "remove_inactive": service.xray_removes_inactive(),
        "timestamp": int(time.time()),
    }


@router.post("/api/system/xray/migrate")
async def xray_migrate(body: Annotated[Migration, Body()], service: ServiceDep) -> dict[str, Any]:
    path = Path(body.config_path)
    if not path.is_absolute():
        raise Invalid("config_path: must be an absolute path")
    plan, created = await service.migrate(path, body.dry_run, body.replace)
    return {
        "dry_run": body.dry_run,
        "plan": plan,
        "created": [key_object(k, service) for k in created],
        "timestamp": int(time.time()),
    }


@router.post("/api/system/xray/migrate/rollback")
async def xray_migrate_rollback(service: ServiceDep) -> dict[str, Any]:
    restored, removed = await service.rollback_migration()
    return {
        "restored_from": restored,
        "removed_keys": [k.name for k in removed],
        "timestamp": int(time.time()),
    }
