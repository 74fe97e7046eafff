"""The daemon's wiring: build the service from the settings, start it (reconcile the table), serve
and say READY, then finish the start (backup, Xray's drift) before any operation, serve until
SIGTERM or SIGINT, then write a final snapshot. systemd hears of each stage (READY, STOPPING, the
watchdog), and the memory start-up used is handed back to the system."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import TaskStatus

from daemon import netinfo
from daemon.counters import Counters
from daemon.http import metrics
from daemon.logs.repeats import RepeatedFailure
from daemon.reports import FleetReports, fleet_outbox, webhook_outbox
from daemon.sdnotify import Notifier
from daemon.service import Service
from daemon.service.loops import backup_loop, poll_loop
from daemon.service.xray_side import XraySide
from daemon.settings import Settings
from daemon.store.history import History, cleanup_loop
from daemon.store.state import StateStore
from daemon.store.usage import UsageSink

if TYPE_CHECKING:
    from daemon.fleet.delivery import FleetNode
    from daemon.fleet.keys import FleetKeys

Log = structlog.typing.FilteringBoundLogger


async def run_daemon(
    settings: Settings,
    serve: Callable[..., Coroutine[Any, Any, None]],
    notifier: Notifier,
    log: Log,
) -> None:
    """Start, reconcile, serve until SIGTERM/SIGINT, then write a final snapshot."""
    store = StateStore(settings.state_file, backups=settings.state_backups)
    state = store.load()
    outbox = webhook_outbox(
        settings.state_dir / "outbox", settings.webhook_url, settings.webhook_secret, log
    )
    fleet = fleet_outbox(
        settings.state_dir / "reports", settings.report_url, settings.report_api_key, log
    )
    history = History(settings.state_dir / "history.sqlite3", settings.history_retention_days)
    sinks: list[UsageSink] = [history]
    node = _fleet_node(settings, state.ensure_instance(), log) if settings.fleet_dsn else None
    if node is not None:
        delivery = node.delivery
        sinks.append(
            FleetReports(delivery.outbox, settings.server_name, delivery.instance, extended=True)
        )
    elif settings.report_url:
        sinks.append(FleetReports(fleet, settings.server_name, state.ensure_instance()))
    for sink in sinks:
        sink.recover(state.generation)
    xray = None if settings.xray_config is None else XraySide(settings, log)
    service = Service(
        settings,
        store,
        state,
        Counters(settings.nft_table),
        outbox,
        log,
        host=netinfo,
        xray=xray,
        sinks=sinks,
        history=history,
    )
    service.fleet = node
    service.fleet_keys = None if node is None else _fleet_keys(node, service, log)
    fleet_limits = None if node is None else _fleet_limits(service, node, log)
    started = time.perf_counter()
    await service.reconcile()
    await service.start_xray()
    stop, ready = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as background:
        background.start_soon(poll_loop, service, _textfile_writer(service, settings, log))
        background.start_soon(backup_loop, service)
        background.start_soon(outbox.deliver_forever)
        background.start_soon(fleet.deliver_forever)
        background.start_soon(cleanup_loop, history, log)
        if node is not None:  # never awaited here: start-up does not wait for the database
            background.start_soon(node.db.run)
            background.start_soon(node.delivery.run)
        if fleet_limits is not None:
            background.start_soon(fleet_limits)
        if service.fleet_keys is not None:  # the fleet's keys followed before READY (bounded)
            await service.fleet_keys.converge_at_start()
            background.start_soon(service.fleet_keys.run)
        if notifier.watchdog_interval:
            background.start_soon(_watchdog, notifier, notifier.watchdog_interval)
        # Holds the service's lock from here on: what it does after READY comes before any
        # operation. Among it the backup, a known-good copy from every start that succeeded, for
        # `portmeter state restore`; a start that fails before READY writes none, so restarts
        # never rotate them out.
        await background.start(_finish_start, service, ready)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as serving:
                await serving.start(serve, service, stop)  # READY only once the socket listens
                log.info(
                    "daemon_ready",
                    keys=service.key_count(),
                    table=settings.nft_table,
                    socket=str(settings.socket),
                    port_range=str(settings.port_range),
                    startup_seconds=round(time.perf_counter() - started, 3),
                )
                notifier.notify("READY=1\nSTATUS=counting")
                ready.set()
                async for signum in signals:
                    log.info("daemon_stopping", signal=signal.Signals(signum).name)
                    notifier.notify("STOPPING=1")
                    break
                stop.set()
        background.cancel_scope.cancel()
    await service.poll_once(final=True)
    if node is not None:
        await node.db.close()
    log.info("daemon_stopped", keys=service.key_count())


def _fleet_limits(
    service: Service, node: FleetNode, log: Log
) -> Callable[[], Coroutine[Any, Any, None]]:
    """Fleet reads, limits counting every server, resets passed on, retention in PostgreSQL."""
    from daemon.fleet.limits import attach

    return attach(service, node, log)


def _fleet_node(settings: Settings, instance: str, log: Log) -> FleetNode:
    """The fleet database side, imported only when it is configured: a server without
    PORTMETER_FLEET_DSN never loads the PostgreSQL driver."""
    from daemon.fleet.delivery import fleet_node

    return fleet_node(settings, instance, log)


def _fleet_keys(node: FleetNode, service: Service, log: Log) -> FleetKeys:
    """The fleet's keys (README "Keys created once"), imported only with a fleet database."""
    from daemon.fleet.keys import FleetKeys

    return FleetKeys(node.db, service, log)


async def _finish_start(
    service: Service, ready: anyio.Event, *, task_status: TaskStatus[None]
) -> None:
    """The start's work that READY need not wait for (`Service.finish_start`), then the memory
    it all used is settled."""
    await service.finish_start(ready, task_status=task_status)
    _settle_memory()


def _settle_memory() -> None:
    """Tens of thousands of long-lived objects per thousand keys: left to the cyclic collector,
    each full collection walks all of them (~0.3 s at 10,000 keys, at random moments). So they
    are frozen out of its sight once start-up made them, and the heap it freed goes back."""
    gc.collect()
    gc.freeze()
    _return_free_memory()


def _return_free_memory() -> None:
    """Give the heap that start-up used and freed (reading the state, rendering Xray's config,
    listing the table) back to the system: about 50 MB at 10,000 keys. glibc only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


async def _watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.notify("WATCHDOG=1")
        await anyio.sleep(interval)


def _textfile_writer(
    service: Service, settings: Settings, log: Log
) -> Callable[[], Awaitable[None]] | None:
    """What the poll loop does after each poll: write node_exporter's textfile, when set (a
    failure, which repeats at every poll, is logged once a minute with a count)."""
    path = settings.metrics_textfile
    if path is None:
        return None
    failures = RepeatedFailure(log, "metrics_textfile_failed", "metrics_textfile_recovered")

    async def write() -> None:
        try:
            await metrics.write_textfile(service, path)
        except OSError as exc:
            failures.failed(error=exc.strerror or str(exc))
            return
        failures.succeeded()

    return write
