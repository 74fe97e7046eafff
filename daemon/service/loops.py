"""The daemon's background loops over the service: the poll (read the kernel, settle, save, then
whatever the wiring hangs after it, such as the metrics textfile) and the periodic state backup.
Nothing that goes wrong in one round ends a loop: a failure is logged and the next round tries
again (README "Faults and their remedies")."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from daemon.errors import OperationError
from daemon.service.front import Service
from daemon.service.kernel_side import describe


async def poll_loop(
    service: Service, after_poll: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Poll forever. A failure is logged once (again when it changes) and the next poll tries
    again; its recovery is logged too. `after_poll` runs after each good poll (a hook, so the
    service never imports the HTTP side that shows its figures)."""
    settings, log = service.settings, service.log
    failing: str | None = None
    while True:
        await anyio.sleep(settings.poll_interval)
        try:
            result = await service.poll_once()
        except Exception as exc:  # the loop must outlive any one failure
            error = exc.detail if isinstance(exc, OperationError) else describe(exc)
            if error != failing:
                log.error(
                    "poll_failed",
                    error=error,
                    remedy="tried again at every poll",
                    exc_info=None if isinstance(exc, OperationError) else exc,
                )
            failing = error
            continue
        if failing is not None:
            log.info("poll_recovered")
            failing = None
        log.debug("poll", seconds=round(service.poll_seconds() or 0, 4), changed=result.changed)
        if after_poll is not None:
            await after_poll()


async def backup_loop(service: Service) -> None:
    """A backup of the state every PORTMETER_SNAPSHOT_INTERVAL seconds (failures are logged)."""
    while True:
        await anyio.sleep(service.settings.snapshot_interval)
        await service.backup()
