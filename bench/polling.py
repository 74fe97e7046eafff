"""Polling: how long one reading of every counter plus the update of the totals takes.

Times come from the daemon itself: each poll of its loop logs `event=poll seconds=…` at debug
level (the same figure as `portmeter_poll_duration_seconds` on GET /metrics, which is not used
here because a scrape makes a reading of its own). The first poll after start is skipped.
"After a change": the first poll after each create or delete through the API, which finds the
table and the keys changed since the poll before.
Usage: .venv/bin/python -m bench.polling [--quick]
"""

from __future__ import annotations

from bench.common import (
    PORT_RANGE,
    SCALE_RANGE,
    append_results,
    interruptible,
    median,
    parse_quick,
    print_table,
    running,
    wait_polls,
)

# (keys, polls measured, changes each followed by a poll)
FULL = [(1000, 10, 6), (10000, 10, 6), (30000, 10, 6)]
QUICK = [(100, 3, 2), (1000, 3, 2)]
TARGETS_MS = {10000: 50.0, 30000: 150.0}


def measure(keys: int, polls: int, changes: int) -> tuple[list[float], list[float]]:
    """Durations (ms) of `polls` polls of a running daemon with `keys` keys (poll interval 1 s),
    then of the first poll after each of `changes` deletes and creates (alternating)."""
    port_range = SCALE_RANGE if keys > PORT_RANGE[1] - PORT_RANGE[0] - 1000 else PORT_RANGE
    env = {"PORTMETER_POLL_INTERVAL": "1", "PORTMETER_LOG_LEVEL": "debug"}
    with running(keys, port_range, **env) as run:
        daemon = run.daemon
        steady = wait_polls(daemon, polls + 1, timeout=60 + polls * 30)[1 : polls + 1]
        after: list[float] = []
        for i in range(changes):
            if i % 2 == 0:  # a delete first: at 30,000 keys the range has no free port
                daemon.api("DELETE", f"/api/keys/{run.keys[i // 2].id}")
            else:
                daemon.create(f"poll-bench-{i}")
            seen = len(wait_polls(daemon, 1, timeout=60))
            after.append(wait_polls(daemon, seen + 1, timeout=60)[seen])
    return [s * 1000 for s in steady], [s * 1000 for s in after]


def main(quick: bool = False) -> None:
    results = [(k, *measure(k, polls, changes)) for k, polls, changes in (QUICK if quick else FULL)]
    targets = ", ".join(f"<= {ms:.0f} ms at {k:,} keys" for k, ms in TARGETS_MS.items())
    print_table(
        f"poll: read every counter and update the totals (daemon's own timing; target {targets})",
        ["keys", "polls", "median ms", "max ms", "after a change: median ms", "max ms"],
        [
            [k, len(ms), f"{median(ms):.1f}", f"{max(ms):.1f}", f"{median(a):.1f}", f"{max(a):.1f}"]
            for k, ms, a in results
        ],
    )
    append_results(
        "poll (read all + totals)",
        [
            (
                f"{k} keys",
                (
                    f"median {median(ms):.1f} ms; max {max(ms):.1f} ms; {len(ms)} polls; "
                    f"after a change: median {median(a):.1f} ms, max {max(a):.1f} ms"
                ),
            )
            for k, ms, a in results
        ],
        quick,
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
