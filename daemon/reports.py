"""Durable outbox for webhooks: at-least-once delivery that survives restarts.

One file per message in the outbox directory, written atomically before the event counts as
sent; a message is deleted only after the receiver answered 2xx. Delivery retries with
exponential backoff. Each POST carries an HMAC-SHA256 of its body so receivers can trust it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import structlog

from daemon.state import write_atomic

SIGNATURE_HEADER = "X-Portmeter-Signature"
MAX_BACKOFF = 300.0


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Outbox:
    def __init__(
        self,
        directory: Path,
        url: str | None,
        secret: str,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.directory = directory
        self.url = url
        self.secret = secret
        self.log = log
        self._wake = anyio.Event()

    def put(self, message: dict[str, Any]) -> None:
        """Queue a message durably; a no-op when no webhook is configured."""
        if not self.url:
            return
        message = {"event_id": secrets.token_hex(8), **message}
        name = f"{time.time_ns():020d}-{message['event_id']}.json"
        write_atomic(self.directory / name, json.dumps(message, sort_keys=True).encode())
        self._wake.set()

    def pending(self) -> list[Path]:
        return sorted(self.directory.glob("*.json")) if self.directory.exists() else []

    async def deliver_forever(self) -> None:
        if not self.url:
            return
        backoff = 1.0
        async with httpx.AsyncClient(timeout=10) as client:
            while True:
                for path in self.pending():
                    if not await self._deliver(client, path):
                        await anyio.sleep(backoff)
                        backoff = min(backoff * 2, MAX_BACKOFF)
                        break
                    backoff = 1.0
                else:
                    self._wake = anyio.Event()
                    with anyio.move_on_after(30):
                        await self._wake.wait()

    async def _deliver(self, client: httpx.AsyncClient, path: Path) -> bool:
        body = path.read_bytes()
        event = json.loads(body)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(self.secret, body),
            "X-Portmeter-Event": str(event.get("event")),
            "X-Portmeter-Delivery": str(event.get("event_id")),
        }
        assert self.url is not None
        try:
            response = await client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            self.log.warning("webhook_failed", webhook_event=event.get("event"), error=type(exc).__name__)
            return False
        if not response.is_success:
            self.log.warning("webhook_refused", webhook_event=event.get("event"), status=response.status_code)
            return False
        path.unlink(missing_ok=True)
        self.log.info("webhook_delivered", webhook_event=event.get("event"), event_id=event.get("event_id"))
        return True
