"""Memory: VmRSS of the daemon process at 0, 1,000, 10,000 and 30,000 keys (range 20001-50000),
after start-up and a few polls (issue 18: <= 120 MiB at 10,000 keys, <= 200 MiB at 30,000).
Usage: .venv/bin/python -m bench.memory [--quick]
"""

from __future__ import annotations

from bench.common import (
    PORT_RANGE,
    SCALE_RANGE,
    append_results,
    interruptible,
    parse_quick,
    print_table,
    python_pid,
    rss_mib,
    running,
    wait_polls,
)

FULL = [0, 1000, 10000, 30000]
QUICK = [0, 100]
POLLS = 3
TARGETS_MIB = {10000: 120.0, 30000: 200.0}


def measure(keys: int) -> float:
    """VmRSS (MiB) of a daemon with `keys` keys after POLLS polls (interval 1 s); sizes beyond
    the default range take the 30,000-key range."""
    port_range = SCALE_RANGE if keys > PORT_RANGE[1] - PORT_RANGE[0] else PORT_RANGE
    with running(keys, port_range, PORTMETER_POLL_INTERVAL="1", PORTMETER_LOG_LEVEL="debug") as run:
        wait_polls(run.daemon, POLLS, timeout=60 + POLLS * 30)
        return rss_mib(python_pid(run.daemon))


def main(quick: bool = False) -> None:
    results = [(keys, measure(keys)) for keys in (QUICK if quick else FULL)]
    print_table(
        f"memory: VmRSS after start-up and {POLLS} polls",
        ["keys", "VmRSS MiB", "target MiB"],
        [[k, f"{rss:.1f}", TARGETS_MIB.get(k, "")] for k, rss in results],
    )
    append_results(
        "memory (VmRSS)",
        [(f"{k} keys", f"{rss:.1f} MiB after {POLLS} polls") for k, rss in results],
        quick,
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
