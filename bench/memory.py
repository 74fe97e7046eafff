"""Memory: VmRSS of the daemon process at 0, 1,000 and 10,000 keys, after start-up and a few polls.
Usage: .venv/bin/python -m bench.memory [--quick]
"""

from __future__ import annotations

from bench.common import (
    append_results,
    interruptible,
    parse_quick,
    print_table,
    python_pid,
    rss_mib,
    running,
    wait_polls,
)

FULL = [0, 1000, 10000]
QUICK = [0, 100]
POLLS = 3
TARGET_MIB = 80.0  # at 10,000 keys


def measure(keys: int) -> float:
    """VmRSS (MiB) of a daemon with `keys` keys after POLLS polls (interval 1 s)."""
    with running(keys, PORTMETER_POLL_INTERVAL="1", PORTMETER_LOG_LEVEL="debug") as run:
        wait_polls(run.daemon, POLLS, timeout=60 + POLLS * 30)
        return rss_mib(python_pid(run.daemon))


def main(quick: bool = False) -> None:
    results = [(keys, measure(keys)) for keys in (QUICK if quick else FULL)]
    print_table(
        f"memory: VmRSS after start-up and {POLLS} polls "
        f"(target <= {TARGET_MIB:.0f} MB at 10,000 keys)",
        ["keys", "VmRSS MiB"],
        [[k, f"{rss:.1f}"] for k, rss in results],
    )
    append_results(
        "memory (VmRSS)",
        [(f"{k} keys", f"{rss:.1f} MiB after {POLLS} polls") for k, rss in results],
        quick,
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
