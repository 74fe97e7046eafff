"""Durable outboxes: messages waiting to be sent, one file each, kept across restarts.

A message is written atomically as `name.json` (deliverable) or `name.staged` (waiting for the
state save it belongs to; `release` makes it deliverable, `discard` drops it). It leaves the
outbox only when the sender says it was delivered (`remove`) or could never be sent
(`set_aside`, renamed `.refused` and kept for the operator). Nothing here talks to the network:
what is sent and how lives in daemon/reports.py.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from pathlib import Path
from typing import Any

import anyio

from daemon.atomic import own_dir, read_regular, remove_stale_temporaries, write_atomic


class Outbox:
    """The files of one outbox directory, and a wake-up for whoever drains it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._wake = anyio.Event()
        self._swept = False  # temporaries a crash left: removed at the first put, not at each

    def put(self, message: dict[str, Any], name: str | None = None, staged: bool = False) -> None:
        """Queue a message durably (as `name.staged` when staged). The directory is read for a
        crash's temporaries once, not at every message: it may hold thousands of them."""
        name = name or f"{time.time_ns():020d}-{secrets.token_hex(4)}"
        path = self.directory / f"{name}{'.staged' if staged else '.json'}"
        own_dir(self.directory)
        if not self._swept:
            remove_stale_temporaries(self.directory, r"[^/]+\.(json|staged)")
            self._swept = True
        write_atomic(path, json.dumps(message, sort_keys=True).encode(), sweep=False)
        if not staged:
            self._wake.set()

    def release(self, name: str) -> None:
        """Make a staged message deliverable."""
        staged = self.directory / f"{name}.staged"
        if staged.exists():
            staged.rename(self.directory / f"{name}.json")
            self._wake.set()

    def discard(self, name: str) -> None:
        (self.directory / f"{name}.staged").unlink(missing_ok=True)

    def staged(self) -> list[str]:
        if not self.directory.exists():
            return []
        return sorted(p.stem for p in self.directory.glob("*.staged"))

    def pending(self) -> list[Path]:
        return sorted(self.directory.glob("*.json")) if self.directory.exists() else []

    def read(self, path: Path) -> bytes:
        """A pending message's body; OSError for anything but a regular file (a planted link)."""
        return read_regular(path)

    def remove(self, path: Path) -> None:
        """The message was delivered."""
        path.unlink(missing_ok=True)

    def set_aside(self, path: Path) -> None:
        """Not a message this outbox wrote: never sent, kept as `.refused` for the operator."""
        with contextlib.suppress(OSError):
            path.rename(path.with_suffix(".refused"))

    async def wait(self, seconds: float) -> None:
        """Until a message becomes deliverable, or `seconds` pass."""
        self._wake = anyio.Event()
        with anyio.move_on_after(seconds):
            await self._wake.wait()
