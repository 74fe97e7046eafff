"""The fleet database as this node sees it (`GET /api/fleet/status`, `portmeter fleet status`;
README "A fleet in PostgreSQL"): is it configured and reachable, why not, and what waits in the
outbox. Answered from memory: a status request never touches the database or the outbox."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from daemon.http.routes import ServiceDep
from daemon.http.schemas import ERROR_RESPONSES

router = APIRouter(responses=ERROR_RESPONSES)


@router.get("/api/fleet/status")
async def fleet_status(service: ServiceDep) -> dict[str, Any]:
    if service.fleet is not None:
        return service.fleet.status()
    return {
        "configured": False,
        "reachable": False,
        "error": None,
        "schema_version": None,
        "server": service.settings.server_name,
        "last_delivered_at": None,
        "backlog": None,
    }
