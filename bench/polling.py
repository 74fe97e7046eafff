"""Polling: how long one reading of every counter plus the update of the totals takes.

Times come from the daemon itself: each poll of its loop logs `event=poll seconds=…` at debug
level (the same figure as `portmeter_poll_duration_seconds` on GET /metrics, which is not used
here because a scrape makes a reading of its own). The first poll after start is skipped.
Usage: .venv/bin/python -m bench.polling [--quick]
"""

from __future__ import annotations

from bench.common import (
    append_results,
    interruptible,
    median,
    parse_quick,
    print_table,
    running,
    wait_polls,
)

FULL = [(1000, 10), (10000, 10)]  # (keys, polls measured)
QUICK = [(100, 3), (1000, 3)]
TARGET_MS = 50.0  # at 10,000 keys


def measure(keys: int, polls: int) -> list[float]:
    """Durations (ms) of `polls` polls of a running daemon with `keys` keys, poll interval 1 s."""
    with running(keys, PORTMETER_POLL_INTERVAL="1", PORTMETER_LOG_LEVEL="debug") as run:
        seconds = wait_polls(run.daemon, polls + 1, timeout=60 + polls * 30)
    return [s * 1000 for s in seconds[1 : polls + 1]]


def main(quick: bool = False) -> None:
    results = [(keys, measure(keys, polls)) for keys, polls in (QUICK if quick else FULL)]
    print_table(
        "poll: read every counter and update the totals "
        f"(daemon's own timing; target <= {TARGET_MS:.0f} ms at 10,000 keys)",
        ["keys", "polls", "median ms", "max ms"],
        [[k, len(ms), f"{median(ms):.1f}", f"{max(ms):.1f}"] for k, ms in results],
    )
    append_results(
        "poll (read all + totals)",
        [
            (f"{k} keys", f"median {median(ms):.1f} ms; max {max(ms):.1f} ms; {len(ms)} polls")
            for k, ms in results
        ],
        quick,
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
