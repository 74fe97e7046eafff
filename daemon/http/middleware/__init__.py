"""ASGI layers around the API app, one small file each: HEAD answers (head), the audit log
(audit), the TCP listener's key check (auth) and the request bodies' limits (bodies).

Each layer is a plain ASGI app wrapping another, kept apart from the routes and from the sockets
(daemon.http.server), so the Unix socket and the TCP listener stack the ones they need. A layer
that refuses a request answers it here, before the app, with `refuse`.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import Message, Scope, Send


async def refuse(
    scope: Scope, send: Send, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    """Answer `{"detail": ...}` with `status` without calling the app (nothing more is read)."""
    answer = JSONResponse({"detail": detail}, status_code=status, headers=headers)
    await answer(scope, _disconnected, send)


async def _disconnected() -> Message:
    return {"type": "http.disconnect"}
