"""ASGI layers around the API app: HEAD answers, the audit log, and the TCP listener's key check.

Kept apart from the routes (api.py) and from the sockets (http_server.py): each layer is a plain
ASGI app wrapping another, so the Unix socket and the TCP listener stack the ones they need.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from enum import Enum
from typing import Any

import structlog
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.logs import RepeatedEvents

# The report intake routes: the only ones a report key (PORTMETER_REPORT_API_KEYS) opens.
INTAKE_ROUTES = frozenset(
    {("POST", "/api/traffic/webhook"), ("POST", "/api/xpert/traffic-webhook")}
)
MISSING_OR_WRONG = "missing or wrong X-API-Key header"


class HeadAsGet:
    """HEAD wherever GET is served (RFC 9110, section 9.3.2): the route answers as for GET, and
    the answer goes out with the same status and headers (Content-Length included), no body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)


class AuditLog:
    """Logs every call that changes something, with the caller's pid/uid and the answer's status."""

    def __init__(self, app: ASGIApp, log: structlog.typing.FilteringBoundLogger) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        status = 500

        async def remember(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, remember)
        finally:
            self.log.info(
                "api_call", method=scope["method"], path=scope["path"], status=status,
                peer=peer_name(scope.get("client")),
            )


def peer_name(client: Any) -> str:
    """A client as logged: `pid=… uid=…` on the Unix socket, `host:port` over TCP."""
    host, port = client or ("unknown", 0)
    return f"{host}:{port}" if port else str(host)


class Role(Enum):
    ADMIN = "admin"  # PORTMETER_API_KEY: everything
    REPORTER = "reporter"  # PORTMETER_REPORT_API_KEYS: the report intake routes only


class Refusal(Exception):
    """A request the guard turns away: its status and one sentence."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def credential(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The one key a request presents, from `X-API-Key: KEY` or `Authorization: Bearer KEY`.

    RFC 9110, section 11: the scheme is case-insensitive and followed by one or more spaces; any
    other scheme, or a bare `Authorization: KEY`, is refused. An empty X-API-Key counts as not
    sent (some clients send the header empty), and two headers naming different keys are refused
    rather than one of them chosen.
    """
    supplied: set[bytes] = set()
    for name, value in headers:
        if name == b"x-api-key" and value:
            supplied.add(value)
        elif name == b"authorization":
            scheme, _, token = value.partition(b" ")
            token = token.lstrip(b" ")
            if scheme.lower() != b"bearer" or not token:
                raise Refusal(401, "Authorization must be `Bearer <key>`")
            supplied.add(token)
    if not supplied:
        raise Refusal(401, MISSING_OR_WRONG)
    if len(supplied) > 1:
        raise Refusal(401, "X-API-Key and Authorization name different keys")
    return supplied.pop()


class ApiKeyGuard:
    """The TCP listener's gate: every request needs a key (see `credential`), except the page and
    its static files (no data in them) and subscriptions (their unguessable token is the secret,
    and VPN apps cannot send headers). The admin key opens every route, a report key only the
    report intake. Keys are compared as SHA-256 digests in constant time, each against all keys.
    Refusals are logged as `request_refused`, at most once per interval with a count."""

    OPEN_PREFIXES = ("/sub/", "/static/")

    def __init__(
        self, app: ASGIApp, api_key: str, report_keys: Iterable[str], events: RepeatedEvents
    ) -> None:
        self.app = app
        self.events = events
        self.keys = [(_digest(api_key.encode()), Role.ADMIN)] + [
            (_digest(key.encode()), Role.REPORTER) for key in report_keys
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._open(scope["path"]):
            try:
                self._check(scope)
            except Refusal as refusal:
                await self._refuse(scope, send, refusal)
                return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> None:
        role = self.role(credential(scope["headers"]))
        if role is None:
            raise Refusal(401, MISSING_OR_WRONG)
        if role is Role.REPORTER and (scope["method"], scope["path"]) not in INTAKE_ROUTES:
            raise Refusal(403, "this key may only send usage reports (POST /api/traffic/webhook)")

    def role(self, key: bytes) -> Role | None:
        digest = _digest(key)
        matches = [role for known, role in self.keys if hmac.compare_digest(known, digest)]
        return matches[0] if matches else None

    async def _refuse(self, scope: Scope, send: Send, refusal: Refusal) -> None:
        self.events.happened(
            "request_refused", level=logging.WARNING, status=refusal.status,
            reason=refusal.detail, method=scope["method"], path=scope["path"],
            peer=peer_name(scope.get("client")),
        )
        headers = {"www-authenticate": 'Bearer realm="portmeter"'} if refusal.status == 401 else {}
        answer = JSONResponse(
            {"detail": refusal.detail}, status_code=refusal.status, headers=headers
        )
        await answer(scope, _disconnected, send)

    def _open(self, path: str) -> bool:
        return path == "/" or path.startswith(self.OPEN_PREFIXES)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}
