"""Idle CPU: the daemon's own CPU time over a long idle window at 30,000 keys (ports 20001-50000),
poll interval 10 s.

utime + stime of the daemon's Python process (/proc/PID/stat), the delta over the window divided
by its wall time. `run_all` starts this daemon first and reads it last, running the other
benchmarks (in daemons and namespaces of their own) meanwhile: only this process's CPU time is
counted, so their load does not enter the figure.
Usage: .venv/bin/python -m bench.idle [--quick]
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

from bench.common import (
    SCALE_RANGE,
    append_results,
    cpu_seconds,
    interruptible,
    median,
    parse_quick,
    poll_seconds,
    print_table,
    python_pid,
    running,
)
from tests.conftest import Daemon

FULL_KEYS, FULL_WINDOW = 30000, 600.0
QUICK_KEYS, QUICK_WINDOW = 100, 30.0
POLL_INTERVAL = "10"
TARGET = 0.01  # of one core


@dataclass
class IdleMeter:
    """A running idle daemon and its CPU time when the window opened."""

    daemon: Daemon
    keys: int
    pid: int = 0
    cpu0: float = 0.0
    wall0: float = 0.0
    polls0: int = 0

    def __post_init__(self) -> None:
        self.pid = python_pid(self.daemon)
        self.cpu0, self.wall0 = cpu_seconds(self.pid), time.monotonic()
        self.polls0 = len(poll_seconds(self.daemon))

    def finish(self, window: float, quick: bool) -> None:
        """Wait until `window` seconds have passed since the start, then report the CPU share."""
        time.sleep(max(0.0, self.wall0 + window - time.monotonic()))
        cpu, wall = cpu_seconds(self.pid) - self.cpu0, time.monotonic() - self.wall0
        polls = poll_seconds(self.daemon)[self.polls0 :]
        share = cpu / wall
        print_table(
            f"idle CPU: poll interval {POLL_INTERVAL} s, daemon's own utime+stime over the window "
            f"(target <= {TARGET:.0%} of a core)",
            ["keys", "window s", "CPU s", "of a core", "polls", "poll median ms"],
            [
                [
                    self.keys,
                    f"{wall:.0f}",
                    f"{cpu:.2f}",
                    f"{share:.2%}",
                    len(polls),
                    f"{median(polls) * 1000:.0f}" if polls else "-",
                ]
            ],
        )
        append_results(
            "idle CPU, poll 10 s",
            [
                (
                    f"{self.keys} keys",
                    (
                        f"{share:.2%} of a core "
                        f"({cpu:.2f} s CPU over {wall:.0f} s, {len(polls)} polls)"
                    ),
                ),
            ],
            quick,
        )


@contextlib.contextmanager
def idle_daemon(keys: int) -> Iterator[IdleMeter]:
    """A daemon with `keys` keys left idle (poll interval 10 s); its CPU window opens at READY."""
    env = {"PORTMETER_POLL_INTERVAL": POLL_INTERVAL, "PORTMETER_LOG_LEVEL": "debug"}
    with running(keys, SCALE_RANGE, **env) as run:
        yield IdleMeter(run.daemon, keys)


def main(quick: bool = False) -> None:
    keys, window = (QUICK_KEYS, QUICK_WINDOW) if quick else (FULL_KEYS, FULL_WINDOW)
    with idle_daemon(keys) as meter:
        meter.finish(window, quick)


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
