"""Request bodies: JSON whatever the client's Content-Type says, bounded in size and depth."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from daemon.bounds import BATCH_PATH, MAX_BATCH_BODY_BYTES, MAX_BODY_BYTES, MAX_BODY_DEPTH
from daemon.http.middleware import refuse


class JsonBodies:
    """Every request body is JSON (so `curl -d '{"name": "alice"}'` works without -H), at most
    MAX_BODY_BYTES bytes (a batch of keys: MAX_BATCH_BODY_BYTES) and MAX_BODY_DEPTH levels deep:
    larger or deeper bodies are refused before parsing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
        scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        most = MAX_BATCH_BODY_BYTES if scope["path"] == BATCH_PATH else MAX_BODY_BYTES
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > most:
                detail = f"request body larger than {most} bytes"
                await refuse(scope, send, 413, detail)
                return
        if json_depth(body) > MAX_BODY_DEPTH:
            detail = f"request body nested deeper than {MAX_BODY_DEPTH} levels"
            await refuse(scope, send, 400, detail)
            return
        await self.app(scope, _replay(body, receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body read already, then the client's next messages."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def json_depth(body: bytes) -> int:
    """How deeply brackets nest in a JSON text, ignoring brackets inside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for char in body.decode("utf-8", errors="replace"):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest
