"""The listener's guards as pure logic: which key a request presents, connection bookkeeping,
client grouping, the open-file limit raised at start and the unit's LimitNOFILE."""

from __future__ import annotations

import asyncio
import configparser
import errno
import logging
import os
import resource
import subprocess
import sys
from collections.abc import MutableMapping
from typing import Any

import pytest
import structlog
from starlette.types import Message, Receive, Scope, Send

from daemon import bounds
from daemon.http.middleware.auth import MISSING_OR_WRONG, ApiKeyGuard, Refusal, credential
from daemon.http.server import (
    ConnectionGate,
    Listener,
    ListenerLimits,
    bind_tcp_socket,
    client_group,
    raw_answer,
    repeated_errors_logged,
    uvicorn_server,
)
from daemon.logs import RepeatedEvents
from daemon.settings import SettingsError, load_settings
from tests.conftest import REPO

KEY = b"k" * 20
ADMIN = "the-admin-key-0123"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"x-api-key", KEY)], KEY),
        ([(b"authorization", b"Bearer " + KEY)], KEY),
        ([(b"authorization", b"bEaReR  " + KEY)], KEY),
        ([(b"x-api-key", b""), (b"authorization", b"Bearer " + KEY)], KEY),
        ([(b"x-api-key", KEY), (b"authorization", b"bearer " + KEY)], KEY),
    ],
)
def test_the_presented_key(headers: list[tuple[bytes, bytes]], expected: bytes) -> None:
    assert credential(headers) == expected


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ([], MISSING_OR_WRONG),
        ([(b"x-api-key", b"")], MISSING_OR_WRONG),
        ([(b"authorization", KEY)], "Authorization must be `Bearer <key>`"),
        ([(b"authorization", b"Basic " + KEY)], "Authorization must be `Bearer <key>`"),
        ([(b"authorization", b"Bearer")], "Authorization must be `Bearer <key>`"),
        ([(b"authorization", b"Bearer " + KEY), (b"authorization", b"Bearer other-key")],
         "X-API-Key and Authorization name different keys"),
        ([(b"x-api-key", b"other-key"), (b"authorization", b"Bearer " + KEY)],
         "X-API-Key and Authorization name different keys"),
    ],
)
def test_refused_credentials(headers: list[tuple[bytes, bytes]], detail: str) -> None:
    with pytest.raises(Refusal) as refused:
        credential(headers)
    assert (refused.value.status, refused.value.detail) == (401, detail)


def test_the_gate_counts_per_client_and_in_total() -> None:
    gate = ConnectionGate(total=3, per_client=2)
    assert gate.admit("a") is None and gate.admit("a") is None
    assert gate.admit("a") == "a holds its limit of 2 connections; retry later"
    assert gate.admit("b") is None
    assert gate.admit("c") == "the server holds its limit of 3 connections; retry later"
    gate.release("a")
    assert gate.admit("c") is None
    for client in ("a", "b", "c"):
        gate.release(client)
    assert gate.count == 0 and not gate.held


def test_clients_are_grouped_by_address_and_ipv6_prefix() -> None:
    assert client_group("198.51.100.7") == "198.51.100.7"
    assert client_group("::ffff:198.51.100.7") == "198.51.100.7"
    assert client_group("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert client_group("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_group("fe80::1%veth0") == "fe80::/64"


def test_a_raw_answer_is_complete_http() -> None:
    answer = raw_answer(503, 'busy "now"', ("retry-after", "10"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 503 Service Unavailable", b"content-type: application/json",
        f"content-length: {len(body)}".encode(), b"connection: close", b"retry-after: 10",
    ]
    assert body == b'{"detail": "busy \\"now\\""}'


HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


@pytest.mark.parametrize(
    ("soft", "hard", "expected"),
    [
        (1024, 4096, (4096, 4096)),  # raised to the hard limit
        (1024, HARD, (min(bounds.OPEN_FILES, HARD), HARD)),  # raised to the budget
        (HARD, HARD, (HARD, HARD)),  # never lowered
    ],
)
def test_the_soft_open_files_limit_is_raised_as_far_as_the_hard_one_allows(
    soft: int, hard: int, expected: tuple[int, int]
) -> None:
    code = "from daemon.http.server import raise_open_files_limit as r; print(*r())"
    result = subprocess.run(
        ["prlimit", f"--nofile={soft}:{hard}", sys.executable, "-c", code],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    assert tuple(map(int, result.stdout.split())) == expected


def test_the_unit_gives_the_open_files_the_caps_need() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read(REPO / "systemd" / "portmeter.service")
    assert int(parser["Service"]["LimitNOFILE"]) == bounds.OPEN_FILES
    assert bounds.OPEN_FILES >= 1.5 * bounds.MAX_HTTP_CONNECTIONS


def test_event_loop_errors_are_counted_not_printed(capsys: pytest.CaptureFixture[str]) -> None:
    """The accept failure that once filled stderr with 290,810 lines in 40 s: now one line per
    interval, and uvicorn's own warnings likewise; the loop's handlers come back afterwards."""

    async def flood() -> list[MutableMapping[str, Any]]:
        loop = asyncio.get_running_loop()
        with structlog.testing.capture_logs() as captured:
            events = RepeatedEvents(structlog.get_logger(), 0.05, loop.call_later)
            with repeated_errors_logged(events):
                for _ in range(1000):
                    loop.call_exception_handler({
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(errno.EMFILE, "Too many open files"),
                    })
                logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
                await asyncio.sleep(0.2)
            assert loop.get_exception_handler() is None
        return captured

    captured = asyncio.run(flood())
    assert [(e["event"], e["count"]) for e in captured] == [
        ("loop_error", 1), ("server_message", 1), ("loop_error", 999)
    ]
    assert captured[0]["message"] == "socket.accept() out of system resource"
    assert logging.getLogger("uvicorn.error").propagate
    assert capsys.readouterr().err == ""


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The process environment without the caller's PORTMETER_* settings."""
    for name in list(os.environ):
        if name.startswith("PORTMETER_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PORTMETER_REALITY_DEST", "www.example.org:443")
    return monkeypatch


REFUSED_SETTINGS = [
    ({"PORTMETER_REPORT_API_KEYS": "short-key"},
     "PORTMETER_REPORT_API_KEYS: each key must be 16-256 visible ASCII characters"),
    ({"PORTMETER_REPORT_API_KEYS": "a-long-enough-key, with a space in it"},
     "PORTMETER_REPORT_API_KEYS: each key must be 16-256 visible ASCII characters"),
    ({"PORTMETER_API_KEY": ADMIN, "PORTMETER_REPORT_API_KEYS": f"other-key-0123456789,{ADMIN}"},
     "PORTMETER_REPORT_API_KEYS must not hold PORTMETER_API_KEY"),
    ({"PORTMETER_HTTP_MAX_CONNECTIONS": "10", "PORTMETER_HTTP_MAX_CONNECTIONS_PER_CLIENT": "11"},
     "PORTMETER_HTTP_MAX_CONNECTIONS_PER_CLIENT must not exceed PORTMETER_HTTP_MAX_CONNECTIONS"),
    ({"PORTMETER_HTTP_HEAD_TIMEOUT": "0"},
     "PORTMETER_HTTP_HEAD_TIMEOUT: Input should be greater than or equal to 0.1"),
    ({"PORTMETER_HTTP_MAX_CONNECTIONS": "10001"},
     "PORTMETER_HTTP_MAX_CONNECTIONS: Input should be less than or equal to 10000"),
]


@pytest.mark.parametrize(("env", "message"), REFUSED_SETTINGS)
def test_listener_settings_are_checked_at_start(
    environ: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        environ.setenv(name, value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert message in str(refused.value)
    for secret in ("short-key", "with a space", ADMIN):  # keys are secrets: never in a message
        assert secret not in str(refused.value)


def test_report_keys_are_a_comma_list(environ: pytest.MonkeyPatch) -> None:
    environ.setenv("PORTMETER_REPORT_API_KEYS", " node-key-0123456789 ,other-key-0123456789,")
    settings = load_settings()
    assert settings.report_api_keys == ("node-key-0123456789", "other-key-0123456789")
    assert "node-key" not in repr(settings)


def test_a_websocket_upgrade_gives_its_connection_slot_back() -> None:
    """uvicorn's WebSocket protocol took such a connection over, so the slot was never released;
    now the upgrade is answered as plain HTTP (through the key check) and the slot comes back."""

    async def run() -> tuple[int, int, bytes]:
        gate = ConnectionGate(total=4, per_client=4)
        events = RepeatedEvents(structlog.get_logger(), 60, asyncio.get_running_loop().call_later)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        sock = bind_tcp_socket("127.0.0.1:0")
        port = sock.getsockname()[1]
        guarded = ApiKeyGuard(app, "admin-key-0123456789", (), events)
        server = uvicorn_server(Listener(sock, guarded, ListenerLimits(5, 5, events, gate)))
        serving = asyncio.create_task(server.serve([sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        head = await reader.readuntil(b"\r\n\r\n")
        held = gate.count
        writer.close()
        await writer.wait_closed()
        for _ in range(100):
            if not gate.count:
                break
            await asyncio.sleep(0.01)
        server.should_exit = True
        await serving
        return held, gate.count, head.split(b"\r\n", 1)[0]

    held, after, status = asyncio.run(run())
    assert (held, after, status) == (1, 0, b"HTTP/1.1 401 Unauthorized")


def test_the_key_check_lets_no_other_scope_through() -> None:
    """A WebSocket scope is closed unread (the app never runs), whatever its path."""
    called: list[Scope] = []
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        called.append(scope)

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def run() -> None:
        events = RepeatedEvents(structlog.get_logger(), 60, asyncio.get_running_loop().call_later)
        guard = ApiKeyGuard(app, "admin-key-0123456789", (), events)
        for path in ("/api/keys", "/static/x", "/"):
            await guard({"type": "websocket", "path": path, "headers": []}, receive, send)

    asyncio.run(run())
    assert called == [] and sent == [{"type": "websocket.close", "code": 1008}] * 3
