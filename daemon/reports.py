"""What goes into the outboxes and how it is delivered: webhooks for key events, and usage
reports to a fleet collector.

A `Courier` is an outbox (daemon/store/outbox.py keeps the files) with a receiver: it POSTs each
deliverable message and removes it only after the receiver answered 2xx (at-least-once, retried
with exponential backoff, across restarts). Without a receiver URL nothing is queued. Webhook
bodies carry an HMAC-SHA256 signature; fleet reports carry the collector's API key.

Fleet reports are a usage sink: the batch for state generation g is staged as
`g-instance.staged` (g in 12 digits, the state line's instance beside it, so the files of a line
before `portmeter state restore` never meet those of the next) before the state is saved and
becomes deliverable (`.json`) once it is; a batch staged for a generation the state never reached
is deleted at start. So the collector receives exactly the usage the state file holds, and
duplicates (a retry after a lost answer) carry the same report ids, which the collector ignores.
For the fleet database a message also carries its dedupe id (`message_id`), and resets go as
messages of their own named `g~reset-...`, sorting after generation g's usage; a periodic reset
is staged with the generation whose save holds the usage before it, released with it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import structlog

from daemon.atomic import disk_full, failure_reason
from daemon.store.outbox import Outbox
from daemon.store.usage import SinkError, UsageDelta

SIGNATURE_HEADER = "X-Portmeter-Signature"
MAX_BACKOFF = 300.0
Headers = Callable[[bytes], dict[str, str]]


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Courier(Outbox):
    """An outbox drained over HTTP to `url`; `headers` signs or authenticates each body."""

    def __init__(
        self,
        directory: Path,
        url: str | None,
        headers: Headers,
        log: structlog.typing.FilteringBoundLogger,
        kind: str = "webhook",
    ) -> None:
        super().__init__(directory)
        self.url = url
        self.headers = headers
        self.log = log
        self.kind = kind

    def put(self, message: dict[str, Any], name: str | None = None, staged: bool = False) -> None:
        """Queue a message durably; a no-op without a URL (nothing would ever send it)."""
        if self.url:
            super().put(message, name, staged)

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
                    await self.wait(30)

    async def _deliver(self, client: httpx.AsyncClient, path: Path) -> bool:
        try:
            body = self.read(path)
        except OSError as exc:  # not a message this outbox wrote: never sent, set aside
            self.log.error(f"{self.kind}_unreadable", message=path.name, error=failure_reason(exc))
            self.set_aside(path)
            return True
        headers = {"Content-Type": "application/json", **self.headers(body)}
        assert self.url is not None
        try:
            response = await client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            self.log.warning(f"{self.kind}_failed", message=path.name, error=type(exc).__name__)
            return False
        if not response.is_success:
            self.log.warning(f"{self.kind}_refused", message=path.name, status=response.status_code)
            return False
        self.remove(path)
        self.log.info(f"{self.kind}_delivered", message=path.name)
        return True


def webhook_outbox(
    directory: Path, url: str | None, secret: str, log: structlog.typing.FilteringBoundLogger
) -> Courier:
    """Key events (limited, expired, reset ...), each POST signed with HMAC-SHA256."""

    def headers(body: bytes) -> dict[str, str]:
        event = json.loads(body)
        return {
            SIGNATURE_HEADER: signature(secret, body),
            "X-Portmeter-Event": str(event.get("event")),
            "X-Portmeter-Delivery": str(event.get("event_id")),
        }

    return Courier(directory, url, headers, log)


class FleetReports:
    """A usage sink that sends each saved generation's per-key deltas to the collector in the
    report intake's format (README "Usage history, the Traffic Manager page, a fleet,
    Prometheus"): {user_token, server, port, protocol, bytes_uploaded, bytes_downloaded}."""

    def __init__(self, outbox: Outbox, server: str, instance: str, extended: bool = False) -> None:
        self.outbox = outbox
        self.server = server
        self.instance = instance  # the state file's: ids stay unique across restored backups
        # For the fleet database (daemon/fleet/delivery.py): also the key's id, uuid and epoch
        # and the packets, which the report intake (unknown fields refused) does not take.
        self.extended = extended

        self._resets: list[str] = []  # staged reset messages, oldest first, until released

    def _stem(self, generation: int) -> str:
        return f"{generation:012d}-{self.instance}"

    def recover(self, committed: int) -> None:
        for name in self.outbox.staged():
            generation = generation_of(name)
            if generation is None or generation > committed:
                self.outbox.discard(name)
            else:
                self.outbox.release(name)

    def put_resets(self, resets: list[dict[str, str]], generation: int, staged: bool) -> None:
        """Queue resets as one message after generation `generation`'s usage (`~` sorts after
        `-`; the moment in nanoseconds and a random part keep two at one generation apart).
        `staged`: that generation is not saved yet, the message waits for its commit. Raises
        OSError."""
        stem = f"{generation:012d}~reset-{time.time_ns():020d}-{secrets.token_hex(4)}"
        message = {"message_id": f"{self.server}:{self.instance}:{stem}", "resets": resets}
        self.outbox.put(message, name=stem, staged=staged)
        if staged:
            self._resets.append(stem)

    def stage(self, generation: int, at: datetime, deltas: Sequence[UsageDelta]) -> None:
        reports = [
            {
                "report_id": f"{self.server}:{self.instance}:{generation}:{d.key_id}:{d.epoch}",
                "user_token": d.name,
                "server": self.server,
                "port": d.port,
                "protocol": "vless",
                "bytes_uploaded": d.rx_bytes,
                "bytes_downloaded": d.tx_bytes,
                "timestamp": int(at.timestamp()),
                **(self._extension(d) if self.extended else {}),
            }
            for d in deltas
        ]
        message: dict[str, Any] = {"reports": reports}
        if self.extended:
            message["message_id"] = f"{self.server}:{self.instance}:{generation:012d}"
        try:
            self.outbox.put(message, name=self._stem(generation), staged=True)
        except OSError as exc:
            raise SinkError(
                f"cannot stage fleet report: {failure_reason(exc)}", disk_full=disk_full(exc)
            ) from None

    @staticmethod
    def _extension(d: UsageDelta) -> dict[str, Any]:
        return {
            "key_id": d.key_id,
            "uuid": d.uuid,
            "epoch": d.epoch,
            "rx_packets": d.rx_packets,
            "tx_packets": d.tx_packets,
        }

    def commit(self, generation: int) -> None:
        """The usage first, then the resets that follow it (a delivery that sees a reset sees
        the usage before it). A reset staged for a save that failed waits for the next one: the
        reset stays made in memory, and a start discards it with the unsaved generation."""
        self.outbox.release(self._stem(generation))
        waiting = []
        for stem in self._resets:
            if (generation_of(stem) or 0) <= generation:
                self.outbox.release(stem)
            else:
                waiting.append(stem)
        self._resets = waiting

    def rollback(self, generation: int) -> None:
        self.outbox.discard(self._stem(generation))


def generation_of(stem: str) -> int | None:
    """The generation a reports outbox file belongs to: its leading digits (files of older
    versions are named by the generation alone); None for a name this outbox never wrote."""
    found = re.match(r"[0-9]{1,20}", stem)
    return int(found.group()) if found else None


def fleet_outbox(
    directory: Path, url: str | None, api_key: str, log: structlog.typing.FilteringBoundLogger
) -> Courier:
    """Usage reports, each POST carrying the collector's API key (when one is set)."""
    return Courier(
        directory, url, lambda _: {"X-API-Key": api_key} if api_key else {}, log, kind="report"
    )
