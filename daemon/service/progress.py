"""What a long operation is doing now: `GET /api/system/operation` shows it, and the CLI that
waits for the operation prints it (a migration of thousands of clients takes seconds to
minutes; README "Xray"). Memory only, read without the service's lock.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class Progress:
    """The operation under way (None: none that reports progress), its phase and how far."""

    operation: str | None = None
    phase: str = ""
    done: int = 0
    total: int = 0
    started: float = 0.0  # time.monotonic() at the start

    @contextlib.contextmanager
    def running(self, operation: str) -> Iterator[Progress]:
        """Report `operation` until the block ends, however it ends."""
        self.operation, self.started = operation, time.monotonic()
        self.enter("starting")
        try:
            yield self
        finally:
            self.operation = None
            self.enter("")

    def enter(self, phase: str, total: int = 0) -> None:
        """A new phase, of `total` steps (0: not counted)."""
        self.phase, self.done, self.total = phase, 0, total

    def step(self) -> None:
        self.done += 1

    def answer(self) -> dict[str, Any]:
        """The shape `GET /api/system/operation` answers with."""
        if self.operation is None:
            return {"operation": None, "phase": None, "done": 0, "total": 0, "seconds": 0.0}
        return {
            "operation": self.operation,
            "phase": self.phase,
            "done": self.done,
            "total": self.total,
            "seconds": round(time.monotonic() - self.started, 1),
        }
