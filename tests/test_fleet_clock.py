"""The database's clock against this server's (daemon/fleet/db.py `measure_skew`): whole seconds,
moved only by a sample that leaves the skew in use by more than CLOCK_SKEW_WARN, and never by a
sample whose round trip took too long: a jittery measurement must not move a moment this server
compares with its own."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import structlog

from daemon.fleet import db as fleetdb


class Clock:
    """The database's answer `offset` seconds ahead, after a round trip of `rtt` seconds."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.offset = 0.0
        self.rtt = 0.01

    def time(self) -> float:
        return self.now

    async def execute(self, _query: str) -> Clock:
        self.now += self.rtt / 2
        self.answer = self.now + self.offset
        self.now += self.rtt / 2
        return self

    async def fetchone(self) -> tuple[float]:
        return (self.answer,)


@pytest.mark.parametrize(
    ("samples", "used"),
    [
        ([0.3, -0.4, 1.9], 0.0),  # NTP-close: no skew at all
        ([86_400.2], 86_400.0),  # a day: whole seconds
        ([86_400.2, 86_399.4, 86_400.6, 86_399.6], 86_400.0),  # jitter never moves it
        ([86_400.2, 90.0], 90.0),  # a clock set right moves it
        ([86_400.2, 0.5], 0.0),  # and back to none
    ],
)
def test_the_skew_in_use_moves_only_past_the_warning_bound(
    samples: list[float], used: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(fleetdb.time, "time", clock.time)
    db = fleetdb.FleetDB("dbname=none", structlog.get_logger())

    async def main() -> None:
        for offset in samples:
            clock.offset = offset
            await db.measure_skew(clock)  # type: ignore[arg-type]

    anyio.run(main)
    assert db.skew == used
    assert db.status.clock_skew == pytest.approx(samples[-1], abs=0.01)


def test_a_slow_sample_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(fleetdb.time, "time", clock.time)
    db = fleetdb.FleetDB("dbname=none", structlog.get_logger())
    clock.offset, clock.rtt = 3600.0, 5.0  # the loop was busy: the midpoint could be seconds off

    async def main() -> Any:
        return await db.measure_skew(clock)  # type: ignore[arg-type]

    assert anyio.run(main) == 0.0 and db.status.clock_skew is None
