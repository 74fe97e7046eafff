"""The TCP listener's key check: who may call what (README "Usage history, the Traffic Manager
page, a fleet, Prometheus", its TCP listener).

The Unix socket needs none: its file permissions are its guard (daemon.http.server stacks this
layer on the TCP listener alone).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from enum import Enum

from starlette.types import ASGIApp, Receive, Scope, Send

from daemon.http.middleware import refuse
from daemon.http.middleware.audit import peer_name
from daemon.logs import RepeatedEvents

# The report intake routes: the only ones a report key (PORTMETER_REPORT_API_KEYS) opens.
INTAKE_ROUTES = frozenset(
    {("POST", "/api/traffic/webhook"), ("POST", "/api/xpert/traffic-webhook")}
)
MISSING_OR_WRONG = "missing or wrong X-API-Key header"


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

    HTTP's rule: the auth scheme is case-insensitive and followed by one or more spaces; any
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
        if scope["type"] != "http":
            # Plain HTTP only: a WebSocket (or any other) scope would pass unchecked.
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        if not self._open(scope["path"]):
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
            "request_refused",
            level=logging.WARNING,
            status=refusal.status,
            reason=refusal.detail,
            method=scope["method"],
            path=scope["path"],
            peer=peer_name(scope.get("client")),
        )
        headers = {"www-authenticate": 'Bearer realm="portmeter"'} if refusal.status == 401 else {}
        await refuse(scope, send, refusal.status, refusal.detail, headers)

    def _open(self, path: str) -> bool:
        return path == "/" or path.startswith(self.OPEN_PREFIXES)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()
