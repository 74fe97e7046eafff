"""The sockets the API answers on, and what guards them: the Unix socket, the optional TCP
listener, uvicorn's HTTP/1.1 protocol with deadlines and connection caps, and `serve()`.

Both listeners share one event loop, so nothing a TCP client does may hold the loop or the
daemon's open files: a request head and a request body must arrive within their timeouts (408
and close), the TCP listener holds at most so many connections in total and per client address
(503 and close at once, before anything is read), the open-file soft limit is raised at start,
and repeated failures are logged once per interval with a count. README "Usage history, the
Traffic Manager page, a fleet, Prometheus" (its TCP listener).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import resource
import socket
import struct
import termios
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import anyio
import h11
import structlog
import uvicorn
from anyio.abc import TaskStatus
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from daemon import bounds
from daemon.atomic import make_dirs
from daemon.http.app import served_app
from daemon.http.middleware.audit import peer_name
from daemon.http.middleware.auth import ApiKeyGuard
from daemon.logs import RepeatedEvents, RepeatedRecords
from daemon.service import Service
from daemon.settings import Settings

LISTEN_BACKLOG = 256
# Connections accepted per turn of the event loop: a flood of new TCP connections costs each turn
# at most this many accepts (and open files in flight), so Unix-socket clients get their turn.
ACCEPT_BATCH = 16
# Loggers whose records go through RepeatedEvents while the daemon serves.
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "asyncio")
# Seconds between two looks at an answer the client is still taking (see _await_delivery).
DELIVERY_CHECK = 0.2


class SocketBusy(Exception):
    """Another daemon already answers on the socket path."""


def bind_unix_socket(path: Path, gid: int | None) -> socket.socket:
    """Listen on `path` with mode 0660 and the operators' group `gid` (None: root's group only),
    replacing a stale socket file."""
    make_dirs(path.parent, 0o750, gid)
    if path.exists():
        if _answers(path):
            raise SocketBusy(f"{path}: another portmeter daemon is already listening there")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    with contextlib.ExitStack() as undo:
        undo.callback(sock.close)
        undo.callback(staging.unlink, missing_ok=True)
        sock.bind(str(staging))
        os.chmod(staging, 0o660)
        if gid is not None:
            os.chown(staging, 0, gid)
        os.rename(staging, path)
        sock.listen(LISTEN_BACKLOG)
        undo.pop_all()
    return sock


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bind_tcp_socket(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise SocketBusy(f"PORTMETER_HTTP_LISTEN={address}: {exc.strerror}") from None
    sock.listen(LISTEN_BACKLOG)
    return sock


def raise_open_files_limit(target: int = bounds.OPEN_FILES) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to `target` if it is lower and the hard limit allows (systemd
    starts services with a soft limit of 1024 unless the unit sets LimitNOFILE=). Returns the
    limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def client_group(host: str) -> str:
    """What the per-client cap counts by: an IPv4 address, or an IPv6 client's /64 (one host
    is usually given a whole /64); an IPv4-mapped IPv6 address counts as its IPv4 address."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass
class ConnectionGate:
    """The connections one listener holds, in total and per client group; pure bookkeeping."""

    total: int
    per_client: int
    held: Counter[str] = field(default_factory=Counter)
    count: int = 0

    def admit(self, client: str) -> str | None:
        """Hold one more connection of `client`, or say why not (nothing is held then)."""
        if self.count >= self.total:
            return f"the server holds its limit of {self.total} connections; retry later"
        if self.held[client] >= self.per_client:
            return f"{client} holds its limit of {self.per_client} connections; retry later"
        self.held[client] += 1
        self.count += 1
        return None

    def release(self, client: str) -> None:
        self.count -= 1
        self.held[client] -= 1
        if not self.held[client]:
            del self.held[client]


@dataclass
class ListenerLimits:
    """What one listener's connections must keep to; `gate` is None on the Unix socket (its
    permissions are its guard), a ConnectionGate on the TCP listener."""

    head_timeout: float
    body_timeout: float
    events: RepeatedEvents
    gate: ConnectionGate | None = None


class ListenerConfig(uvicorn.Config):
    """uvicorn's settings plus the listener's limits, which every connection's protocol reads."""

    def __init__(self, app: ASGIApp, limits: ListenerLimits, **options: Any) -> None:
        super().__init__(app, **options)
        self.limits = limits


def raw_answer(status: int, detail: str, *headers: tuple[str, str]) -> bytes:
    """A whole HTTP/1.1 answer with a JSON detail that closes the connection: for refusals made
    below the app (at accept, on a timeout), where no request cycle exists to answer through."""
    body = json.dumps({"detail": detail}).encode()
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class ListenerProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, plus:

    - on the Unix socket, the peer's pid and uid (SO_PEERCRED) as `client`, so every mutating
      call can be logged with who made it;
    - a deadline for each request head (from the connection, or the end of the previous answer,
      until the head is complete) and for each body (from the head until the body is complete):
      past it the client gets 408 and the connection is closed (a connection that sent nothing
      of a new request is closed without an answer);
    - the idle clocks (uvicorn's keep-alive, the next head's deadline) start when an answer has
      been delivered, not when it was queued: a client reading a large answer slowly keeps its
      connection for its next request; one that takes none of it for the body timeout is
      dropped;
    - on TCP, TCP_NODELAY: an answer's head and body are two writes, and Nagle's algorithm held
      the body until the client's delayed ACK of the head (44 ms a request on a kept-alive
      connection). asyncio sets it only on sockets made with proto=IPPROTO_TCP;
    - on the TCP listener, the connection caps, checked before anything is read.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not isinstance(config, ListenerConfig):
            raise TypeError("ListenerProtocol needs a ListenerConfig")
        super().__init__(config, server_state, app_state, _loop)
        self.limits = config.limits
        self._held_for: str | None = None  # the client group this connection counts against
        self._admitted = False
        self._watched: object = None  # the client's h11 state the deadline was set for
        self._deadline: asyncio.TimerHandle | None = None
        self._delivery: asyncio.TimerHandle | None = None  # the next look at an answer's delivery
        self._left = 0  # bytes of the answer the client had not taken at the last look
        self._progress_at = 0.0  # when the client last took some of it

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        gate = self.limits.gate
        if gate is not None:
            peer = transport.get_extra_info("peername")
            group = client_group(str(peer[0])) if peer else "unknown"
            refusal = gate.admit(group)
            if refusal is not None:
                self._refuse(transport, refusal, peer)
                return
            self._held_for = group
        self._admitted = True
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _ = struct.unpack("3i", creds)
            self.client = (f"pid={pid} uid={uid}", 0)
        elif sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._watch()

    def _refuse(self, transport: asyncio.Transport, reason: str, peer: Any) -> None:
        retry = ("retry-after", str(max(1, round(self.limits.head_timeout))))
        transport.write(raw_answer(503, reason, retry))
        transport.close()
        events = self.limits.events
        events.happened("connection_refused", "cap", reason=reason, peer=peer_name(peer))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._cancel_deadline()
        self._stop_delivery_watch()
        gate = self.limits.gate
        if gate is not None and self._held_for is not None:
            gate.release(self._held_for)
            self._held_for = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()
        self._await_delivery()

    def _await_delivery(self) -> None:
        """While the answer is on its way (in asyncio's buffer or the kernel's send queue), the
        idle clocks wait: they start once the client has taken all of it. A look every
        DELIVERY_CHECK seconds; a client that took nothing for the body timeout is dropped."""
        self._stop_delivery_watch()
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # closed, or a pipelined request is under way: it sets the clocks itself
        self._left = self._undelivered()
        if not self._left:
            return
        self._unset_keepalive_if_required()
        self._cancel_deadline()
        self._progress_at = self.loop.time()
        self._look_again()

    def _look_again(self) -> None:
        self._delivery = self.loop.call_later(DELIVERY_CHECK, self._look_at_delivery)

    def _look_at_delivery(self) -> None:
        self._delivery = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        left, now = self._undelivered(), self.loop.time()
        if not left:
            self._start_idle_clocks()
        elif left < self._left:
            self._left, self._progress_at = left, now
            self._look_again()
        elif now - self._progress_at >= self.limits.body_timeout:
            self.transport.abort()  # a client that reads nothing holds a file and a slot
            peer = peer_name(self.client)
            self.limits.events.happened("request_timed_out", "answer", part="answer", peer=peer)
        else:
            self._look_again()

    def _start_idle_clocks(self) -> None:
        """The answer is delivered: the keep-alive (unless a next request has begun) and the
        next head's deadline count from now."""
        if not self.conn.trailing_data[0]:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )
        self._watched = None
        self._watch()

    def _stop_delivery_watch(self) -> None:
        if self._delivery is not None:
            self._delivery.cancel()
            self._delivery = None

    def _undelivered(self) -> int:
        """What of the answers the client has not taken (0: all of it): asyncio's buffer, and
        the socket's send queue (SIOCOUTQ: on a Unix socket what the peer has not read, in
        buffer bytes; on TCP what it has not acknowledged)."""
        queued = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return queued
        try:
            sent = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return queued
        return queued + int(struct.unpack("i", sent)[0])

    def _watch(self) -> None:
        """Set the deadline the client's state calls for, when that state changed."""
        state = self.conn.their_state
        if state is self._watched:
            return
        self._watched = state
        self._cancel_deadline()
        if self.transport.is_closing():
            return
        if state is h11.IDLE:
            self._deadline = self.loop.call_later(self.limits.head_timeout, self._expired, "head")
        elif state is h11.SEND_BODY:
            self._deadline = self.loop.call_later(self.limits.body_timeout, self._expired, "body")

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, part: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        timeout = self.limits.head_timeout if part == "head" else self.limits.body_timeout
        started = part == "body" or bool(self.conn.trailing_data[0])
        if started and self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            detail = f"the request {part} did not arrive within {timeout:g} s"
            self.transport.write(raw_answer(408, detail))
        self.transport.close()
        if started:
            peer = peer_name(self.client)
            self.limits.events.happened("request_timed_out", part, part=part, peer=peer)


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers (the daemon owns SIGTERM/SIGINT), accepting
    ACCEPT_BATCH connections per turn of the loop from a kernel queue of LISTEN_BACKLOG."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # asyncio uses one number for both: the accept batch and listen()'s queue. The server
        # starts with the batch; the queue is set back to its length once it serves.
        await super().startup(sockets)
        for sock in sockets or ():
            sock.listen(LISTEN_BACKLOG)


@contextlib.contextmanager
def repeated_errors_logged(events: RepeatedEvents) -> Iterator[None]:
    """While serving, the event loop's unhandled errors (`socket.accept() out of system
    resource` and the like) and uvicorn's and asyncio's log records go through `events`: one
    line per kind and interval, however often they happen; afterwards the counts left are logged
    and the previous handlers return."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    handler = RepeatedRecords(events)
    loggers = [logging.getLogger(name) for name in SERVER_LOGGERS]
    before = [(lg.propagate, lg.handlers[:]) for lg in loggers]

    def loop_error(_: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        message = str(context.get("message", "event loop error"))
        events.happened(
            "loop_error",
            f"{message}|{type(error).__name__}",
            logging.ERROR,
            message=message,
            error=repr(error),
        )

    loop.set_exception_handler(loop_error)
    for lg in loggers:
        lg.handlers = [handler]
        lg.propagate = False
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
        for lg, (propagate, handlers) in zip(loggers, before, strict=True):
            lg.handlers, lg.propagate = handlers, propagate
        events.flush()


@dataclass
class Listener:
    sock: socket.socket
    app: ASGIApp
    limits: ListenerLimits


def listeners(settings: Settings, app: ASGIApp, events: RepeatedEvents) -> list[Listener]:
    """The Unix socket, and the TCP listener with its key check and connection caps if set."""
    timeouts = (settings.http_head_timeout, settings.http_body_timeout)
    bound = [
        Listener(
            bind_unix_socket(settings.socket, settings.socket_gid),
            app,
            ListenerLimits(*timeouts, events),
        )
    ]
    if settings.http_listen:
        gate = ConnectionGate(
            settings.http_max_connections, settings.http_max_connections_per_client
        )
        try:
            sock = bind_tcp_socket(settings.http_listen)
        except SocketBusy:
            bound[0].sock.close()
            settings.socket.unlink(missing_ok=True)
            raise
        guarded = ApiKeyGuard(app, settings.api_key, settings.report_api_keys, events)
        bound.append(Listener(sock, guarded, ListenerLimits(*timeouts, events, gate)))
    return bound


def uvicorn_server(listener: Listener) -> _QuietServer:
    config = ListenerConfig(
        listener.app,
        listener.limits,
        http=ListenerProtocol,
        # No WebSocket protocol: it would take over the connection from ListenerProtocol, whose
        # connection_lost then never runs to give the connection's slot back to the gate.
        ws="none",
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=3,
        backlog=ACCEPT_BATCH,
    )
    return _QuietServer(config)


async def serve(
    settings: Settings,
    log: structlog.typing.FilteringBoundLogger,
    service: Service,
    stop: anyio.Event,
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer for `service` on the Unix socket (and the TCP listener, if set) until `stop`, then
    finish requests in flight. The daemon's wiring passes `settings` and `log` first
    (functools.partial), so it starts this as `serve(service, stop)`."""
    soft, hard = raise_open_files_limit()
    log.info("open_files_limit", soft=soft, hard=hard)
    loop = asyncio.get_running_loop()
    events = RepeatedEvents(log, settings.log_repeat_interval, loop.call_later)
    app = served_app(service, log)
    bound = listeners(settings, app, events)
    if settings.http_listen:
        log.info(
            "http_listener",
            address=settings.http_listen,
            max_connections=settings.http_max_connections,
            max_connections_per_client=settings.http_max_connections_per_client,
            head_timeout=settings.http_head_timeout,
            body_timeout=settings.http_body_timeout,
        )
    servers = [uvicorn_server(listener) for listener in bound]
    try:
        with repeated_errors_logged(events):
            async with anyio.create_task_group() as tasks:
                for server, listener in zip(servers, bound, strict=True):
                    tasks.start_soon(server.serve, [listener.sock])
                task_status.started()  # the sockets are bound and listening: clients can connect
                await stop.wait()
                for server in servers:
                    server.should_exit = True
    finally:
        for listener in bound:
            listener.sock.close()
        settings.socket.unlink(missing_ok=True)
