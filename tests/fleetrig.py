"""The fleet database's owner in-process, for tests that talk to a real PostgreSQL
(tests/pgserver.py) without a daemon."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
import structlog

from daemon.fleet.db import QUERY_DEADLINE, FleetDB


@contextlib.asynccontextmanager
async def ready_fleet_db(dsn: str, deadline: int = QUERY_DEADLINE) -> AsyncIterator[FleetDB]:
    """A FleetDB on `dsn`, connected and migrated as a node's start does it; closed afterwards."""
    fleet = FleetDB(dsn, structlog.get_logger(), deadline=deadline)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(fleet.run)
        with anyio.fail_after(30):
            await fleet.wait_ready()
        try:
            yield fleet
        finally:
            tasks.cancel_scope.cancel()
    await fleet.close()
