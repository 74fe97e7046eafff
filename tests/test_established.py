"""Established connections per key port: read once per poll with a kernel-side filter on the key
port range, served with the time of that read (README "API").

Pure: the inet_diag bytecode (exact bytes, and run through a model of the kernel's checker and
interpreter for any range and port) and the decoding of a dump. In-process: the answers' shape,
that they serve the poll's figure without reading the host again, and a failed read. Kernel:
real TCP connections in and out of the range in a namespace, counted exactly.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from daemon import netinfo
from daemon.allocator import PortRange
from daemon.nft import codec as nl
from tests.inprocess import InProcessDaemon
from tests.netlab import SERVER_V4, SERVER_V6, Lab, inside

ports = st.integers(0, 0xFFFF)


# --- pure: the bytecode and the dump ---------------------------------------------------------


def kernel_accepts(program: bytes, sport: int) -> bool:
    """The kernel's inet_diag_bc_audit, then inet_diag_bc_run, for the ops the filter uses
    (net/ipv4/inet_diag.c): the audit refuses a program (ValueError), the run accepts a socket
    only if the jumps end exactly at the program's end."""
    op = nl.BC_OP
    length = len(program)
    offset = 0
    while offset < length:  # audit: every op a port comparison with in-bounds, aligned jumps
        code, yes, no = op.unpack_from(program, offset)
        left = length - offset
        if code not in (nl.BC_S_GE, nl.BC_S_LE) or left < 2 * op.size:
            raise ValueError(f"op {code} at {offset}")
        for jump in (yes, no):
            if jump < 2 * op.size or jump > left + 4 or jump % 4:
                raise ValueError(f"jump {jump} at {offset}")
        offset += yes
    if offset != length:
        raise ValueError("the program does not end on an op")
    offset = 0
    while offset < length:  # run
        code, yes, no = op.unpack_from(program, offset)
        port = op.unpack_from(program, offset + op.size)[2]
        holds = sport >= port if code == nl.BC_S_GE else sport <= port
        offset += yes if holds else no
    return offset == length


def test_bytecode_exact_bytes() -> None:
    expected = struct.pack("=BBH", 2, 8, 20) + struct.pack("=BBH", 0, 0, 20001)
    expected += struct.pack("=BBH", 3, 8, 12) + struct.pack("=BBH", 0, 0, 20050)
    assert nl.port_range_bytecode(20001, 20050) == expected


@given(ports, ports, ports)
def test_bytecode_accepts_exactly_the_range(a: int, b: int, sport: int) -> None:
    first, last = min(a, b), max(a, b)
    program = nl.port_range_bytecode(first, last)
    assert kernel_accepts(program, sport) == (first <= sport <= last)


@pytest.mark.parametrize(("first", "last"), [(-1, 5), (5, 4), (1, 65536)])
def test_bytecode_refuses_what_is_no_port_range(first: int, last: int) -> None:
    with pytest.raises(nl.EncodeError):
        nl.port_range_bytecode(first, last)


def test_request_layout() -> None:
    request = nl.established_request(socket.AF_INET6, 10001, 10100, 7)
    length, kind, flags, seq, _pid = nl.HEADER.unpack_from(request)
    assert (length, kind, flags, seq) == (len(request), 20, nl.REQUEST | nl.DUMP, 7)
    family, protocol, ext, states = struct.unpack_from("=BBBxI", request, nl.HEADER.size)
    assert (family, protocol, ext, states) == (socket.AF_INET6, socket.IPPROTO_TCP, 0, 1 << 1)
    attr_at = nl.HEADER.size + 56
    assert nl.attrs(request[attr_at:]) == {1: nl.port_range_bytecode(10001, 10100)}


def diag_message(kind: int, sport: int, seq: int = 1) -> bytes:
    """A sock_diag answer message: an inet_diag_msg (72 bytes) with this local port."""
    body = struct.pack("=BBBB", socket.AF_INET, 1, 0, 0) + struct.pack(">H", sport)
    body = body.ljust(72, b"\0")
    return nl.HEADER.pack(nl.HEADER.size + len(body), kind, nl.MULTI, seq, 0) + body


def test_dump_decoding_reads_ports_until_done() -> None:
    done = nl.HEADER.pack(nl.HEADER.size + 4, nl.NLMSG_DONE, nl.MULTI, 1, 0) + bytes(4)
    chunk = diag_message(20, 10001) + diag_message(20, 10100) + diag_message(20, 10001)
    assert nl.diag_ports(chunk) == ([10001, 10100, 10001], None)
    found, ended = nl.diag_ports(diag_message(20, 10005) + done + diag_message(20, 10006))
    assert found == [10005]
    assert ended is not None and (ended.kind, ended.body) == (nl.NLMSG_DONE, bytes(4))


def test_close_request_filters_one_port_in_every_connected_state() -> None:
    """close_connections' dump: the kernel sends only the sockets of that one port."""
    request = nl.diag_request(socket.AF_INET, netinfo.CONNECTED, 10007, 10007, 3)
    length, kind, flags, seq, _pid = nl.HEADER.unpack_from(request)
    assert (length, kind, flags, seq) == (len(request), 20, nl.REQUEST | nl.DUMP, 3)
    family, protocol, ext, states = struct.unpack_from("=BBBxI", request, nl.HEADER.size)
    assert (family, protocol, ext, states) == (
        socket.AF_INET,
        socket.IPPROTO_TCP,
        0,
        0xFFF & ~((1 << 6) | (1 << 7) | (1 << 10)),
    )
    assert request[nl.HEADER.size + 8 : nl.HEADER.size + 56] == bytes(48)
    program = nl.attrs(request[nl.HEADER.size + 56 :])[1]
    assert program == nl.port_range_bytecode(10007, 10007)
    assert [p for p in (10006, 10007, 10008) if kernel_accepts(program, p)] == [10007]


def test_destroy_request_carries_the_dumped_sockid() -> None:
    sockid = bytes(range(48))
    request = nl.destroy_request(socket.AF_INET6, 0xFF, sockid, 9)
    length, kind, flags, seq, _pid = nl.HEADER.unpack_from(request)
    assert (length, kind, flags, seq) == (nl.HEADER.size + 56, 21, nl.REQUEST | nl.ACK, 9)
    assert struct.unpack_from("=BBBxI", request, nl.HEADER.size) == (
        socket.AF_INET6,
        socket.IPPROTO_TCP,
        0,
        0xFF,
    )
    assert request[nl.HEADER.size + 8 :] == sockid


def test_dump_decoding_reads_each_sockets_id() -> None:
    done = nl.HEADER.pack(nl.HEADER.size + 4, nl.NLMSG_DONE, nl.MULTI, 1, 0) + bytes(4)
    found, ended = nl.diag_sockets(diag_message(20, 10001) + diag_message(20, 10002) + done)
    assert found == [struct.pack(">H", port).ljust(48, b"\0") for port in (10001, 10002)]
    assert ended is not None and ended.kind == nl.NLMSG_DONE


# --- in-process: the answers ----------------------------------------------------------------


def test_answers_serve_the_polls_count_and_its_time(inproc: InProcessDaemon) -> None:
    key = inproc.create("alice")
    other = inproc.create("bob")
    host = inproc.rig.host
    host.connections.update({key["port"]: 3, other["port"]: 1})
    inproc.poll()
    first = inproc.traffic(key["id"])
    assert (first["connections"], type(first["connections_at"])) == (3, int)
    host.connections[key["port"]] = 5  # opened after the poll: not in any answer until the next
    again = inproc.traffic(key["id"])
    assert (again["connections"], again["connections_at"]) == (3, first["connections_at"])
    every = inproc.api("GET", "/api/traffic/ports/exact")["ports_traffic"]
    assert (every["total_connections"], every["connections_at"]) == (4, first["connections_at"])
    inproc.poll()
    later = inproc.traffic(key["id"])
    assert later["connections"] == 5 and later["connections_at"] >= first["connections_at"]
    usage = inproc.api("GET", "/api/admin/usage/alice")["local"]["keys"][0]
    assert (usage["connections"], usage["connections_at"]) == (5, later["connections_at"])
    overview = inproc.api("GET", "/api/admin/usage")
    stamp = usage["connections_at"]
    assert (overview["total_connections"], overview["connections_at"]) == (6, stamp)


def test_before_the_first_poll_an_answer_reads_once(inproc: InProcessDaemon) -> None:
    key = inproc.create("carol")
    inproc.rig.host.connections[key["port"]] = 2
    answer = inproc.traffic(key["id"])
    assert answer["connections"] == 2 and answer["connections_at"] is not None


def test_a_failed_read_keeps_the_last_figure_and_says_so_once(inproc: InProcessDaemon) -> None:
    key = inproc.create("dave")
    host = inproc.rig.host
    host.connections[key["port"]] = 2
    inproc.poll()
    before = inproc.traffic(key["id"])
    host.refuse_read = PermissionError(1, "Operation not permitted")
    host.connections[key["port"]] = 9
    with capture_logs() as logs:
        inproc.poll()
        inproc.poll()
        after = inproc.traffic(key["id"])
        host.refuse_read = None
        inproc.poll()
    events = [e["event"] for e in logs if e["event"].startswith("connections_read")]
    assert events == ["connections_read_failed", "connections_read_recovered"]
    assert (after["connections"], after["connections_at"]) == (2, before["connections_at"])
    assert inproc.traffic(key["id"])["connections"] == 9


# --- kernel: real connections in and out of the range -----------------------------------------

RANGE = PortRange(21001, 21004)
# port -> (family, connections): two ports in the range, one just below and one just above it
OPENED = {
    21001: (socket.AF_INET, 2),
    21004: (socket.AF_INET6, 3),
    21000: (socket.AF_INET, 2),
    21005: (socket.AF_INET6, 1),
}


@contextlib.contextmanager
def connections(net: Lab) -> Iterator[None]:
    """OPENED's connections from the client namespace to listeners in the server namespace, and
    one from the server namespace to its own loopback (its client side has the key port as the
    remote port, never as the local one)."""
    opened: list[socket.socket] = []
    try:
        for port, (family, count) in OPENED.items():
            listener = net.tcp(net.server, family)
            opened.append(listener)
            listener.bind((SERVER_V4 if family == socket.AF_INET else SERVER_V6, port))
            listener.listen()
            for _ in range(count):
                client = net.tcp(net.client, family)
                opened.append(client)
                client.connect(listener.getsockname()[:2])
                opened.append(listener.accept()[0])
        local = net.tcp(net.server)
        opened.append(local)
        local.connect((SERVER_V4, 21001))
        opened.append(opened[0].accept()[0])
        yield
    finally:
        for sock in opened:
            sock.close()


def test_kernel_counts_only_established_sockets_in_the_range(net: Lab) -> None:
    with connections(net), inside(net.server):
        counted = netinfo.established_by_port(RANGE)
        whole = netinfo.established_by_port(PortRange(1, 65535))
    assert counted == {21001: 3, 21004: 3}
    # The filter is the kernel's: the same read over every port sees the others too.
    assert whole[21000] == 2 and whole[21005] == 1 and whole[21001] == 3


def test_kernel_filter_keeps_other_sockets_out_of_the_dump(net: Lab) -> None:
    with connections(net):
        with inside(net.server):
            diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, netinfo.NETLINK_SOCK_DIAG)
        with diag:
            diag.settimeout(5)
            diag.send(nl.established_request(socket.AF_INET, RANGE.first, RANGE.last, 1))
            found: list[int] = []
            ended = None
            while ended is None:
                part, ended = nl.diag_ports(diag.recv(netinfo.DIAG_BUFFER))
                found += part
    assert sorted(found) == [21001, 21001, 21001]
    assert ended.kind == nl.NLMSG_DONE


# --- interface counters, read alongside in every traffic answer ------------------------------

NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop
    lo:   36945     516    0    0    0     0          0         0    36945     516    0    0
  a:b0: 18446744073709551615 1 0 0 0 0 0 0 7 1 0 0
"""


def test_net_dev_table_parsed() -> None:
    assert netinfo.parse_net_dev(NET_DEV) == {
        "lo": {"rx_bytes": 36945, "tx_bytes": 36945},
        "a:b0": {"rx_bytes": 2**64 - 1, "tx_bytes": 7},
    }


def test_interface_bytes_are_the_namespaces_own(net: Lab) -> None:
    with inside(net.server):
        before = netinfo.interface_bytes()
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sender, receiver:
        receiver.bind(("127.0.0.1", 0))
        sender.sendto(b"x" * 100, receiver.getsockname())
        assert receiver.recv(200) == b"x" * 100
    with inside(net.server):
        after = netinfo.interface_bytes()
    assert sorted(after) == sorted(before) and len(after) == 2  # lo and the veth end
    lo = {d: after["lo"][d] - before["lo"][d] for d in ("rx_bytes", "tx_bytes")}
    assert lo == {"rx_bytes": 128, "tx_bytes": 128}  # 100 + UDP 8 + IPv4 20, once each way
