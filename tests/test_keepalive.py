"""Kept-alive connections (issue 23), in-process: the daemon's listener (uvicorn with
daemon.http.server.ListenerProtocol) on a real Unix socket and a real loopback TCP socket, in
front of a small ASGI app, with clients of plain sockets.

- The idle clocks (uvicorn's 5 s keep-alive, the next head's deadline) count from the end of an
  answer's delivery, not from when it was queued: a client that reads a large answer slowly
  gets an answer to its next request on the same connection (100 clients reading the 2.6 MB
  listing lost 4 % of their next requests).
- A client that stops taking its answer is dropped once it took nothing for the body timeout.
- TCP_NODELAY on accepted TCP connections: a request on a kept-alive connection took 44 ms
  (Nagle's algorithm holding the body until the client's delayed ACK of the head).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
import uvicorn
from starlette.types import Receive, Scope, Send

from daemon.http.server import (
    Listener,
    ListenerLimits,
    bind_tcp_socket,
    bind_unix_socket,
    uvicorn_server,
)
from daemon.logs import RepeatedEvents

BIG = 1_500_000  # bytes: more than the kernel's socket buffers hold, as the 2.6 MB listing
SMALL = b'{"ok": true}'


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """/big answers BIG bytes, anything else SMALL; the head and the body are two writes, as
    every JSON answer of the daemon's app is."""
    body = b"x" * BIG if scope["path"] == "/big" else SMALL
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass
class Served:
    connect: Callable[[], socket.socket]  # a blocking client's connection
    logged: list[dict[str, object]]  # the events the listener logged
    server: uvicorn.Server

    def connections(self) -> int:
        return len(self.server.server_state.connections)


@contextlib.asynccontextmanager
async def listening(
    kind: str, directory: Path, head_timeout: float = 10, body_timeout: float = 30
) -> AsyncIterator[Served]:
    """The listener of `kind` (unix or tcp) serving `app`."""
    with structlog.testing.capture_logs() as logged:
        events = RepeatedEvents(structlog.get_logger(), 60, asyncio.get_running_loop().call_later)
        if kind == "unix":
            path = directory / "pm.sock"
            sock = bind_unix_socket(path, None)

            def connect() -> socket.socket:
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.connect(str(path))
                return client
        else:
            sock = bind_tcp_socket("127.0.0.1:0")
            port = sock.getsockname()[1]

            def connect() -> socket.socket:
                client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                # A small window: what the client has not read stays unacknowledged (else the
                # client's kernel would take the whole answer at once, whatever it reads).
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
                client.connect(("127.0.0.1", port))
                return client

        server = uvicorn_server(
            Listener(sock, app, ListenerLimits(head_timeout, body_timeout, events))
        )
        serving = asyncio.create_task(server.serve([sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            yield Served(connect, logged, server)
        finally:
            server.should_exit = True
            await serving
            sock.close()


def ask(client: socket.socket, path: str) -> None:
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: portmeter\r\n\r\n".encode())


def answer(client: socket.socket, chunk: int = 65536, pause: float = 0.0) -> bytes:
    """One whole answer (by its content-length), read `chunk` bytes at a time, `pause` seconds
    apart; b"" if the connection closed before an answer began."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = client.recv(chunk)
        if not got:
            return data
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":", 1)[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
    )
    while len(body) < length:
        time.sleep(pause)
        got = client.recv(chunk)
        if not got:
            break
        body += got
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_a_slowly_read_answer_does_not_cost_the_next_request(kind: str, tmp_path: Path) -> None:
    """The client takes 7.5 s to read a 1.5 MB answer (the keep-alive timeout is 5 s, and 5 s of
    it pass after the answer was queued), then asks again on the same connection: answered."""

    async def run() -> tuple[bytes, bytes, float]:
        async with listening(kind, tmp_path) as served:

            def client() -> tuple[bytes, bytes, float]:
                with served.connect() as sock:
                    sock.settimeout(20)
                    started = time.monotonic()
                    ask(sock, "/big")
                    first = answer(sock, chunk=BIG // 75, pause=0.1)
                    took = time.monotonic() - started
                    ask(sock, "/small")
                    return first, answer(sock), took

            return await asyncio.to_thread(client)

    first, second, took = asyncio.run(run())
    assert first.startswith(b"HTTP/1.1 200 OK") and len(first.partition(b"\r\n\r\n")[2]) == BIG
    assert took > 7
    assert second.startswith(b"HTTP/1.1 200 OK") and second.endswith(SMALL), second[:200]


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_an_idle_connection_still_closes_after_the_keep_alive(kind: str, tmp_path: Path) -> None:
    """Counted from the end of delivery, the keep-alive still ends an idle connection: 5 s
    after a quickly read answer (and a large one read at once), the server closes it."""

    async def run() -> list[float]:
        async with listening(kind, tmp_path) as served:

            def client(path: str) -> float:
                with served.connect() as sock:
                    sock.settimeout(20)
                    ask(sock, path)
                    answer(sock)
                    read_at = time.monotonic()
                    assert sock.recv(1) == b""  # closed by the server
                    return time.monotonic() - read_at

            return [await asyncio.to_thread(client, path) for path in ("/small", "/big")]

    for idle in asyncio.run(run()):
        assert 4.5 < idle < 6.5, idle


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_a_client_that_stops_reading_is_dropped_after_the_body_timeout(
    kind: str, tmp_path: Path
) -> None:
    """Waiting for delivery must not let a client hold its connection (an open file, a slot of
    the caps) by never reading: once it took nothing for the body timeout, it is dropped, and
    the listener says so."""

    async def run() -> tuple[float, list[dict[str, object]]]:
        async with listening(kind, tmp_path, body_timeout=1.5) as served:

            def begin() -> socket.socket:
                sock = served.connect()
                ask(sock, "/big")
                sock.recv(1000)  # the answer began; nothing more is read
                return sock

            with await asyncio.to_thread(begin):
                asked = time.monotonic()
                while served.connections() and time.monotonic() < asked + 15:
                    await asyncio.sleep(0.05)
                took = time.monotonic() - asked
            return took, [dict(e) for e in served.logged]

    took, logged = asyncio.run(run())
    assert 1.4 < took < 4, took
    timed_out = [e for e in logged if e["event"] == "request_timed_out"]
    assert [(e["part"], e["count"]) for e in timed_out] == [("answer", 1)]


def test_requests_on_a_kept_alive_tcp_connection_are_not_held_by_nagle(tmp_path: Path) -> None:
    """20 requests on one connection: each under 20 ms (median). Without TCP_NODELAY each took
    about 44 ms: the body's segment waited for the ACK of the head's, which the client delays."""

    async def run() -> list[float]:
        async with listening("tcp", tmp_path) as served:

            def client() -> list[float]:
                with served.connect() as sock:
                    sock.settimeout(10)
                    took = []
                    for _ in range(20):
                        started = time.perf_counter()
                        ask(sock, "/small")
                        assert answer(sock).endswith(SMALL)
                        took.append(time.perf_counter() - started)
                    return took

            return await asyncio.to_thread(client)

    took = asyncio.run(run())
    assert statistics.median(took) < 0.020, [round(t * 1000, 1) for t in took]
