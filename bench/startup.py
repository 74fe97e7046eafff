"""Start-up: from starting `portmeter run` to READY=1 (sd_notify) with 10,000 and 30,000 keys in
state (issue 18: <= 2 s and <= 5 s; 30,000 keys on the range 20001-50000).

The daemon gets NOTIFY_SOCKET = an AF_UNIX datagram socket this benchmark binds. Two cases, in
turn: table missing (the daemon installs every port; the table is deleted before each such start)
and table present (reconcile only: the daemon was stopped with SIGTERM and starts again on the
same table and state).
Usage: .venv/bin/python -m bench.startup [--quick]
"""

from __future__ import annotations

import signal
import time

from bench.common import (
    PORT_RANGE,
    READY_TIMEOUT,
    SCALE_RANGE,
    ReadyListener,
    append_results,
    generate_state,
    interruptible,
    make_daemon,
    median,
    parse_quick,
    print_table,
    scratch,
)
from tests.conftest import Daemon
from tests.netlab import lab

# (keys, port range, starts of each case)
FULL = [(10000, PORT_RANGE, 2), (30000, SCALE_RANGE, 2)]
QUICK = [(1000, PORT_RANGE, 1)]
CASES = ("table missing", "table present")


def start_to_ready(daemon: Daemon, ready: ReadyListener) -> float:
    """Start the daemon; seconds until it sends READY=1."""
    started = time.perf_counter()
    daemon.start(wait=False)
    ready.wait_ready(
        READY_TIMEOUT, alive=lambda: daemon.process is not None and daemon.process.poll() is None
    )
    return time.perf_counter() - started


def stop(daemon: Daemon) -> None:
    """SIGTERM and wait for the daemon's final snapshot and exit."""
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    code = daemon.process.wait(READY_TIMEOUT)
    if code != 0:
        raise RuntimeError(f"daemon exited with {code} on SIGTERM:\n{daemon.log()[-2000:]}")


def measure(keys: int, port_range: tuple[int, int], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {case: [] for case in CASES}
    with lab() as net, scratch() as workdir:
        ready = ReadyListener(workdir / "notify.sock")
        daemon = make_daemon(net, workdir, port_range, NOTIFY_SOCKET=str(ready.path))
        try:
            generate_state(daemon, keys)
            for _ in range(repeats):
                net.nft(
                    "delete", "table", "inet", daemon.table, check=False
                )  # ours: named by this daemon
                times["table missing"].append(start_to_ready(daemon, ready))
                stop(daemon)
                times["table present"].append(start_to_ready(daemon, ready))
                stop(daemon)
        finally:
            daemon.close()
            ready.close()
    return times


def main(quick: bool = False) -> None:
    for keys, port_range, repeats in QUICK if quick else FULL:
        times = measure(keys, port_range, repeats)
        print_table(
            f"start-up to READY=1 with {keys} keys in state",
            ["case", "starts", "median s", "max s"],
            [[case, len(t), f"{median(t):.2f}", f"{max(t):.2f}"] for case, t in times.items()],
        )
        append_results(
            "start-up to READY",
            [
                (
                    f"{keys} keys",
                    "; ".join(
                        f"{case}: median {median(t):.2f} s (max {max(t):.2f}, {len(t)} starts)"
                        for case, t in times.items()
                    ),
                ),
            ],
            quick,
        )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
