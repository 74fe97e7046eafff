"""Test hosts on one machine: network namespaces joined by a veth pair, and sockets inside them.

A socket keeps the namespace it was created in, so the test process creates sockets inside a
namespace (setns on this thread, then back) and uses them from ordinary test code. Traffic only
ever goes between namespaces the test made, or to their loopback.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pyroute2.netns import popns, pushns

# RFC 2544 benchmarking range and a ULA prefix: never routed anywhere, and only inside our netns.
SERVER_V4, CLIENT_V4 = "198.18.0.1", "198.18.0.2"
SERVER_V6, CLIENT_V6 = "fd00:504d::1", "fd00:504d::2"
_names = itertools.count()


def wait_for(predicate: Callable[[], object], timeout: float = 10, what: str = "condition") -> None:
    """Poll `predicate` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def unique_name(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 100000}x{next(_names)}"


@contextlib.contextmanager
def inside(netns: str) -> Iterator[None]:
    pushns(netns)
    try:
        yield
    finally:
        popns()


def make_socket(netns: str, family: int, kind: int) -> socket.socket:
    with inside(netns):
        return socket.socket(family, kind)


@dataclass
class Lab:
    """A server namespace (where the daemon runs) and a client namespace, joined by veth."""

    server: str
    client: str

    def udp(self, where: str, family: int = socket.AF_INET) -> socket.socket:
        sock = make_socket(where, family, socket.SOCK_DGRAM)
        sock.settimeout(5)
        return sock

    def tcp(self, where: str, family: int = socket.AF_INET) -> socket.socket:
        sock = make_socket(where, family, socket.SOCK_STREAM)
        sock.settimeout(10)
        return sock

    def nft(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.server, "nft", *args, check=check)


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    server, client = unique_name("pms"), unique_name("pmc")
    veth_s, veth_c = unique_name("vs"), unique_name("vc")
    try:
        for ns in (server, client):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh(
            "ip",
            "-n",
            server,
            "link",
            "add",
            veth_s,
            "type",
            "veth",
            "peer",
            "name",
            veth_c,
            "netns",
            client,
        )
        for ns, dev, v4, v6 in (
            (server, veth_s, SERVER_V4, SERVER_V6),
            (client, veth_c, CLIENT_V4, CLIENT_V6),
        ):
            sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        yield Lab(server, client)
    finally:
        for ns in (server, client):
            sh("ip", "netns", "del", ns, check=False)


def iperf_client(net: Lab, port: int, seconds: int, *extra: str) -> list[str]:
    """An iperf3 client in the lab's client namespace against the server address, JSON output."""
    return [
        "ip", "netns", "exec", net.client, "iperf3", "-c", SERVER_V4, "-p", str(port),
        "-t", str(seconds), "-J", *extra,
    ]
