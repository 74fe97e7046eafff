"""The in-process layer's rig: the real Service, StateStore and Xray side on a temporary directory,
over the in-memory kernel and host of daemon/kernel.py. No root, no namespace, no process.

    async with started() as rig:
        key = await rig.service.create_key("alice")
        rig.kernel.add_traffic(key.port, rx=1_000)
        await rig.service.poll_once()

The service is started as `portmeter run` starts it (reconcile the table, then Xray's start);
Xray's changes are written to `rig.xray_config` and never applied (PORTMETER_XRAY_APPLY=none).
"""

from __future__ import annotations

import contextlib
import functools
import json
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import anyio
import httpx
import structlog
from anyio.from_thread import BlockingPortal, start_blocking_portal

from daemon.allocator import PortRange
from daemon.http.app import served_app
from daemon.kernel import MemoryHost, MemoryKernel
from daemon.reports import webhook_outbox
from daemon.service import Service
from daemon.service.xray_side import XraySide
from daemon.settings import Settings
from daemon.store.history import History
from daemon.store.state import StateStore

T = TypeVar("T")
FIRST_PORT = 20001
PORTS = 50

Log = structlog.typing.FilteringBoundLogger


@dataclass
class InProcess:
    service: Service
    kernel: MemoryKernel
    host: MemoryHost
    store: StateStore
    history: History | None
    xray: XraySide | None
    directory: Path

    @property
    def xray_config(self) -> Path:
        return self.directory / "xray" / "config.json"


def inprocess_settings(directory: Path, *, xray: bool = True, **extra: Any) -> Settings:
    """Settings of an in-process service in `directory`: ports 20001-20050, Xray's config in
    xray/ and no Xray binary (nothing to run), unless `extra` says otherwise."""
    values: dict[str, Any] = {
        "state_dir": directory / "state",
        "socket": directory / "pm.sock",
        "nft_table": "memory",
        "port_range": PortRange(FIRST_PORT, FIRST_PORT + PORTS - 1),
        "xray_config": directory / "xray" / "config.json" if xray else None,
        "xray_bin": directory / "no-xray",
        "reality_dest": "www.example.org:443",
        "public_host": "vpn.example.net",
        "xray_apply": "none",
    }
    return Settings(**{**values, **extra})


@contextlib.asynccontextmanager
async def started(
    *,
    xray: bool = True,
    history: bool = True,
    xray_config: Mapping[str, Any] | None = None,
    store: Callable[[Path], StateStore] = StateStore,
    side: Callable[[Settings, Log], XraySide] = XraySide,
    directory: Path | None = None,
    **extra: Any,
) -> AsyncIterator[InProcess]:
    """A started service in a temporary directory, removed afterwards.

    `xray`: the Xray integration on (its config file is `xray_config`, when given); `history`:
    the usage history in the state dir, a sink of every save, as the daemon has it; `store` and
    `side` make the state store and the Xray side (a test's subclass that fails on demand);
    `directory`: start in this one instead, kept afterwards (a restart: the state and files as
    the service before left them); `extra`: settings."""
    place = (
        tempfile.TemporaryDirectory(prefix="pm-inproc-")
        if directory is None
        else contextlib.nullcontext(str(directory))
    )
    with place as name:
        directory = Path(name)
        settings = inprocess_settings(directory, xray=xray, **extra)
        if xray_config is not None:
            (directory / "xray").mkdir()
            (directory / "xray" / "config.json").write_text(json.dumps(xray_config, indent=2))
        log: Log = structlog.get_logger()
        kernel, host = MemoryKernel(settings.nft_table), MemoryHost.quiet()
        saved, made = store(settings.state_file), side(settings, log) if xray else None
        usage = (
            History(settings.state_dir / "history.sqlite3", settings.history_retention_days)
            if history
            else None
        )
        outbox = webhook_outbox(directory / "outbox", None, "", log)
        state = saved.load()
        if usage is not None:
            usage.recover(state.generation)
        service = Service(
            settings,
            saved,
            state,
            kernel,
            outbox,
            log,
            host=host,
            xray=made,
            sinks=() if usage is None else (usage,),
            history=usage,
        )
        try:
            await service.reconcile()
            await service.start_xray()
            ready = anyio.Event()
            ready.set()
            await service.finish_start(ready)  # what the daemon does right after READY
            yield InProcess(service, kernel, host, saved, usage, made, directory)
        finally:
            if usage is not None:
                usage.close()


class Requests(Protocol):
    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response: ...


class DaemonSurface:
    """What tests call on a daemon, real (tests.conftest.Daemon) or in-process: its API through
    `http`, and its state dir."""

    http: Requests
    state_dir: Path

    def api(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        assert response.status_code == expect, (
            f"{method} {path}: {response.status_code} {response.text}"
        )
        assert response.headers["content-type"].startswith("application/json")
        return response.json()

    def create(self, name: str, **extra: Any) -> dict[str, Any]:
        return dict(self.api("POST", "/api/keys", expect=201, json={"name": name, **extra}))

    def traffic(self, key: str) -> dict[str, Any]:
        return dict(self.api("GET", f"/api/keys/{key}/traffic/port/exact"))

    def saved_state(self) -> dict[str, Any]:
        """What the daemon has saved (snapshot plus journal), as the state file's JSON. Read
        again if the daemon replaced the snapshot meanwhile: a compaction between reading the
        old snapshot and the emptied journal would show neither's keys (with a key or two,
        every save is a compaction)."""
        snapshot = self.state_dir / "state.json"
        while True:
            before = snapshot.stat().st_ino if snapshot.exists() else None
            loaded = StateStore(snapshot).load()
            if (snapshot.stat().st_ino if snapshot.exists() else None) == before:
                return dict(json.loads(loaded.model_dump_json()))

    def state_bytes(self) -> bytes:
        """Everything saved, byte for byte: a refused operation must not change it."""
        journal = self.state_dir / "state.journal"
        snapshot = self.state_dir / "state.json"
        return snapshot.read_bytes() + (journal.read_bytes() if journal.exists() else b"")


class InProcessDaemon(DaemonSurface):
    """The test surface of tests.conftest.Daemon (`api`, `create`, `traffic`, `http`,
    `saved_state`, `state_bytes`) over an in-process service and the app exactly as the Unix
    socket serves it. Tests of API shapes, validation and logic use it without root; the kernel
    layer keeps the real daemon for what only a real kernel and process prove."""

    def __init__(self, portal: BlockingPortal, rig: InProcess, client: httpx.AsyncClient) -> None:
        self.portal, self.rig, self._client = portal, rig, client
        self.http = _SyncClient(portal, client)

    @property
    def service(self) -> Service:
        return self.rig.service

    @property
    def kernel(self) -> MemoryKernel:
        return self.rig.kernel

    @property
    def state_dir(self) -> Path:
        return self.rig.directory / "state"

    def run(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run a coroutine function on the service's event loop (e.g. a poll)."""
        return self.portal.call(call)

    def poll(self) -> None:
        self.run(self.service.poll_once)

    def datagrams(self, port: int, count: int, wire: int, *, echo: bool = False) -> int:
        """What a UDP exchange makes the kernel count (tests/test_counting.py's udp_exchange):
        `count` datagrams of `wire` bytes (payload and headers) into `port`, one packet each, and
        each one that arrived answered by one of the same size if `echo`. Returns how many
        arrived: a quota drops the others, as the kernel does."""
        arrived = 0
        for _ in range(count):
            before = self._received(port)
            self.kernel.add_traffic(port, rx=wire)
            if self._received(port) == before:
                continue
            arrived += 1
            if echo:
                self.kernel.add_traffic(port, tx=wire)
        return arrived

    def _received(self, port: int) -> int:
        """The rx bytes of `port`'s counter (0 while it has none)."""
        found = self.kernel.contents()[1].get(port)
        return 0 if found is None else found[3]


class _SyncClient:
    """httpx's request methods, run on the portal's loop, for tests written synchronously."""

    def __init__(self, portal: BlockingPortal, client: httpx.AsyncClient) -> None:
        self._portal, self._client = portal, client

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._portal.call(functools.partial(self._client.request, method, path, **kwargs))

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)


@contextlib.contextmanager
def inprocess_daemon(**options: Any) -> Iterator[InProcessDaemon]:
    """A started in-process service (options as `started` takes them) and a client of its app."""
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(started(**options)) as rig,
    ):
        app = served_app(rig.service, rig.service.log)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://portmeter"
        )
        try:
            yield InProcessDaemon(portal, rig, client)
        finally:
            portal.call(client.aclose)
