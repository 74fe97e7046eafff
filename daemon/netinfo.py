"""Read-only facts about this host's sockets and interfaces, from the kernel via pyroute2.

Blocking netlink calls: the service runs them in a worker thread.
"""

from __future__ import annotations

import socket
from collections import Counter

from pyroute2 import DiagSocket, IPRoute

from daemon.allocator import PortRange

TCP_ESTABLISHED = 1
TCP_LISTEN = 10
FAMILIES = (socket.AF_INET, socket.AF_INET6)


def established_by_port(port_range: PortRange) -> dict[int, int]:
    """Established TCP connections whose local port is in the range, counted per port."""
    counts: Counter[int] = Counter()
    with DiagSocket() as diag:
        diag.bind()
        for family in FAMILIES:
            for msg in diag.get_sock_stats(family=family, states=1 << TCP_ESTABLISHED):
                if msg["idiag_sport"] in port_range:
                    counts[msg["idiag_sport"]] += 1
    return dict(counts)


def bound_ports(port_range: PortRange) -> set[int]:
    """Ports of the range that some process listens on (TCP) or has bound (UDP)."""
    ports: set[int] = set()
    with DiagSocket() as diag:
        diag.bind()
        for family in FAMILIES:
            queries = (
                {"protocol": socket.IPPROTO_TCP, "states": 1 << TCP_LISTEN},
                {"protocol": socket.IPPROTO_UDP, "states": 0xFFFFFFFF},
            )
            for query in queries:
                for msg in diag.get_sock_stats(family=family, **query):
                    if msg["idiag_sport"] in port_range:
                        ports.add(msg["idiag_sport"])
    return ports


def interface_bytes() -> dict[str, dict[str, int]]:
    """rx/tx byte counters of every interface of this network namespace."""
    result: dict[str, dict[str, int]] = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            stats = link.get_attr("IFLA_STATS64") or {}
            result[link.get_attr("IFLA_IFNAME")] = {
                "rx_bytes": int(stats.get("rx_bytes", 0)),
                "tx_bytes": int(stats.get("tx_bytes", 0)),
            }
    return result
