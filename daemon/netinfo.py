"""Facts about this host's sockets and interfaces, from the kernel, and the one
change made to them: closing a key's connections (README "Limits, expiry and resets").

Blocking netlink calls: the service runs them in a worker thread.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from daemon.allocator import PortRange
from daemon.nft import codec as nl

TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_LISTEN = 10
ALL_STATES = 0xFFFFFFFF
FAMILIES = (socket.AF_INET, socket.AF_INET6)
# Every TCP state of a connection that still holds a socket the kernel can abort.
CONNECTED = 0xFFF & ~((1 << TCP_TIME_WAIT) | (1 << TCP_CLOSE) | (1 << TCP_LISTEN))
NLMSG_ERROR_CODE = 16  # offset of the error code in an NLMSG_ERROR, after the netlink header
NETLINK_SOCK_DIAG = 4
DIAG_BUFFER = 1 << 16  # larger than any one chunk of a netlink dump
DIAG_TIMEOUT = 10.0  # seconds: a dump the kernel never ends must not hold a worker forever
NET_DEV = "/proc/thread-self/net/dev"  # the calling thread's namespace, as netlink would see
T = TypeVar("T")
Decoded = tuple[list[T], nl.Message | None]  # what one chunk of a dump held, and its end if seen


def established_by_port(port_range: PortRange) -> dict[int, int]:
    """Established TCP connections whose local port is in the range, counted per port.

    The kernel filters by state and port (an inet_diag bytecode, daemon/nft/codec.py), so the
    host's other sockets are never sent here, however many there are."""
    counts: Counter[int] = Counter()
    with _diag_socket() as diag:
        for seq, family in enumerate(FAMILIES, 1):
            diag.send(nl.established_request(family, port_range.first, port_range.last, seq))
            counts.update(_dumped(diag, nl.diag_ports))
    return dict(counts)


def _diag_socket() -> socket.socket:
    """A sock_diag socket whose reads give up after DIAG_TIMEOUT (use it in a `with`)."""
    diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    diag.settimeout(DIAG_TIMEOUT)
    return diag


def _dumped(diag: socket.socket, decode: Callable[[bytes], Decoded[T]]) -> Iterator[T]:
    """What `decode` finds in each chunk of one dump's answer; OSError if the kernel refused it."""
    while True:
        found, ended = decode(diag.recv(DIAG_BUFFER))
        yield from found
        if ended is not None:
            (code,) = struct.unpack_from("=i", ended.body) if len(ended.body) >= 4 else (0,)
            if code < 0:
                raise OSError(-code, f"sock_diag dump: {os.strerror(-code)}")
            return


def bound_ports(port_range: PortRange) -> set[int]:
    """Ports of the range that some process listens on (TCP) or has bound (UDP).

    The kernel filters by port, so the cost follows the sockets in the range, not the host's."""
    ports: set[int] = set()
    queries = ((socket.IPPROTO_TCP, 1 << TCP_LISTEN), (socket.IPPROTO_UDP, ALL_STATES))
    with _diag_socket() as diag:
        seq = 0
        for family in FAMILIES:
            for protocol, states in queries:
                seq += 1
                first, last = port_range.first, port_range.last
                diag.send(nl.diag_request(family, states, first, last, seq, protocol))
                ports.update(_dumped(diag, nl.diag_ports))
    return ports


def interface_bytes() -> dict[str, dict[str, int]]:
    """rx/tx byte counters of every interface of this thread's network namespace.

    The kernel's text table of the same 64-bit counters netlink gives (IFLA_STATS64): one small
    file read, where a pyroute2 link dump cost 2-7 ms of every traffic answer."""
    return parse_net_dev(Path(NET_DEV).read_text())


def parse_net_dev(table: str) -> dict[str, dict[str, int]]:
    """/proc/net/dev's table: two heading lines, then `name: rx_bytes ... (8 receive fields)
    tx_bytes ...` per interface (a name holds no whitespace, but may hold a colon)."""
    result: dict[str, dict[str, int]] = {}
    for line in table.splitlines()[2:]:
        name, _, numbers = line.rpartition(":")
        fields = numbers.split()
        result[name.strip()] = {"rx_bytes": int(fields[0]), "tx_bytes": int(fields[8])}
    return result


def close_connections(port: int) -> int:
    """Abort every TCP connection whose local port is `port`, IPv4 and IPv6; how many were closed.

    SOCK_DESTROY over inet_diag: the kernel aborts the local socket (its owner, Xray, gets
    ECONNABORTED and frees it) and sends a reset to the peer. Needs CAP_NET_ADMIN and a kernel
    with CONFIG_INET_DIAG_DESTROY; a connection that ended meanwhile is not counted. Any other
    refusal raises OSError. The kernel filters the dump by the port, so the host's other sockets
    are never sent here."""
    closed = 0
    with _diag_socket() as diag:
        for seq, family in enumerate(FAMILIES, 1):
            diag.send(nl.diag_request(family, CONNECTED, port, port, seq))
            found = list(_dumped(diag, nl.diag_sockets))
            closed += sum(_destroy(diag, family, sockid, port) for sockid in found)
    return closed


def _destroy(diag: socket.socket, family: int, sockid: bytes, port: int) -> bool:
    """Abort the one socket `sockid` (its addresses, ports, interface and cookie, as the dump
    gave them); False if it is gone already."""
    diag.send(nl.destroy_request(family, CONNECTED, sockid, 0))
    for message in nl.messages(diag.recv(DIAG_BUFFER)):
        if message.kind == nl.NLMSG_ERROR:
            code = nl.error_code(message.body)[0]
            if code in (0, errno.ENOENT):
                return code == 0
            raise OSError(code, f"SOCK_DESTROY for port {port}: {os.strerror(code)}")
    raise OSError(errno.EPROTO, f"SOCK_DESTROY for port {port}: no acknowledgement")
