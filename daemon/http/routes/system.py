"""The port range and the kernel table: which key holds which port, checks and repairs
(`/api/system/ports`)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from daemon import allocator
from daemon.http.routes import ServiceDep
from daemon.http.schemas import ERROR_RESPONSES

router = APIRouter(responses=ERROR_RESPONSES)


@router.get("/api/system/ports")
async def ports(service: ServiceDep) -> dict[str, Any]:
    assignments = service.assigned_ports()
    port_range = service.port_range()
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


@router.post("/api/system/ports/reset")
async def ports_reset(service: ServiceDep) -> dict[str, Any]:
    before = await service.check()
    result = await service.reconcile()
    after = await service.check()
    service.log.info("ports_reconciled", problems_before=len(before), problems_after=len(after))
    return {
        "table_rebuilt": result.table_rebuilt,
        "installed_ports": result.installed,
        "removed_ports": result.removed,
        "problems_before": before,
        "problems_after": after,
        "timestamp": int(time.time()),
    }


@router.get("/api/system/ports/status")
async def ports_status(service: ServiceDep) -> dict[str, Any]:
    problems = await service.check()
    return {
        "valid": not problems,
        "problems": problems,
        "total_keys": service.key_count(),
        "port_range": str(service.port_range()),
        "nft_table": f"inet {service.nft_table()}",
        "timestamp": int(time.time()),
    }


@router.get("/api/system/operation")
async def operation(service: ServiceDep) -> dict[str, Any]:
    """The long operation under way (a migration), its phase and how far it got: answered at
    once, also while that operation holds the daemon (`portmeter migrate` shows it)."""
    return {**service.operation(), "timestamp": int(time.time())}
