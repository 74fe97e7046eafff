"""The per-poll count of established connections, with many sockets outside the key range.

10,000 established TCP connections on a port outside the key range and 100 inside it, in a test
namespace; each round counts the range's connections two ways: the kernel-filtered read the
daemon uses (daemon/netinfo.py) and, for comparison, the unfiltered pyroute2 dump it replaced
(every established socket of the host sent and decoded, then filtered here).
Usage: .venv/bin/python -m bench.connections [--quick]
"""

from __future__ import annotations

import contextlib
import resource
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pyroute2 import DiagSocket

from bench.common import (
    append_results,
    interruptible,
    median,
    parse_quick,
    percentile,
    print_table,
)
from daemon import netinfo
from daemon.allocator import PortRange
from daemon.nft.codec import TCP_ESTABLISHED
from tests.netlab import SERVER_V4, Lab, inside, lab

KEYS = PortRange(20001, 21000)
INSIDE_PORT, OUTSIDE_PORT = 20001, 40000


@dataclass(frozen=True)
class Plan:
    outside: int  # established connections outside the key range
    inside: int
    rounds: int


FULL, QUICK = Plan(10_000, 100, 50), Plan(1_000, 10, 10)


def unfiltered(port_range: PortRange) -> dict[int, int]:
    """The read before the kernel-side filter: every established socket, filtered here."""
    counts: Counter[int] = Counter()
    with DiagSocket() as diag:
        diag.bind()
        for family in netinfo.FAMILIES:
            for msg in diag.get_sock_stats(family=family, states=1 << TCP_ESTABLISHED):
                if msg["idiag_sport"] in port_range:
                    counts[msg["idiag_sport"]] += 1
    return dict(counts)


# The client ends live in a process of their own: one process may not hold both ends of 10,000
# connections under this host's open-file limit.
CLIENTS = """
import socket, sys
held = [socket.create_connection((sys.argv[1], int(sys.argv[2]))) for _ in range(int(sys.argv[3]))]
print("connected", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def connected(net: Lab, port: int, count: int) -> Iterator[None]:
    """`count` connections from the client namespace to a listener on `port` in the server's."""
    opened: list[socket.socket] = []
    command = ["ip", "netns", "exec", net.client, sys.executable, "-c", CLIENTS]
    clients = subprocess.Popen(
        [*command, SERVER_V4, str(port), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        listener = net.tcp(net.server)
        opened.append(listener)
        listener.bind((SERVER_V4, port))
        listener.listen(4096)
        opened += [listener.accept()[0] for _ in range(count)]
        assert clients.stdout is not None and clients.stdout.readline() == "connected\n"
        yield
    finally:
        for sock in opened:
            sock.close()
        clients.communicate(timeout=30)


def timed(read: Callable[[PortRange], dict[int, int]], rounds: int, net: Lab) -> list[float]:
    """Milliseconds of each of `rounds` reads in the server namespace."""
    spent = []
    with inside(net.server):
        for _ in range(rounds):
            started = time.perf_counter()
            read(KEYS)
            spent.append((time.perf_counter() - started) * 1000)
    return spent


def main(quick: bool = False) -> None:
    plan = QUICK if quick else FULL
    needed = plan.outside + plan.inside + 1024
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (needed, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    )
    with (
        lab() as net,
        connected(net, OUTSIDE_PORT, plan.outside),
        connected(net, INSIDE_PORT, plan.inside),
    ):
        with inside(net.server):
            counts = (netinfo.established_by_port(KEYS), unfiltered(KEYS))
        if counts != ({INSIDE_PORT: plan.inside},) * 2:
            raise RuntimeError(f"counts differ from what was opened: {counts}")
        results = {
            "kernel-filtered (now)": timed(netinfo.established_by_port, plan.rounds, net),
            "unfiltered pyroute2 dump (before)": timed(unfiltered, plan.rounds, net),
        }
    rows = [
        [kind, len(ms), f"{median(ms):.2f}", f"{percentile(ms, 0.99):.2f}"]
        for kind, ms in results.items()
    ]
    size = f"{plan.outside} outside, {plan.inside} inside the range"
    title = f"Counting established connections, {size}"
    print_table(title, ["read", "n", "p50 ms", "p99 ms"], rows)
    append_results(
        "established connections read",
        [(size, "; ".join(f"{r[0]}: p50 {r[2]} / p99 {r[3]} ms" for r in rows))],
        quick,
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
