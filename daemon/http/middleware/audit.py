"""The audit log: every call that changes something, with who made it and how it ended."""

from __future__ import annotations

from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
                "api_call",
                method=scope["method"],
                path=scope["path"],
                status=status,
                peer=peer_name(scope.get("client")),
            )


def peer_name(client: Any) -> str:
    """A client as logged: `pid=… uid=…` on the Unix socket, `host:port` over TCP."""
    host, port = client or ("unknown", 0)
    return f"{host}:{port}" if port else str(host)
