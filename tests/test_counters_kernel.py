"""counters.py against the real kernel: the netlink paths agree with libnftables, transactions are
all-or-nothing, and a changed layout is noticed even though polls no longer list the table."""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.accounting import Reading
from daemon.counters import Counters
from daemon.kernel import NftError, PortReading, TableView, port_gaps
from daemon.limits import Quota
from tests.netlab import CLIENT_V4, SERVER_V4, Lab, inside, lab, unique_name

T = TypeVar("T")
PORTS = range(41000, 41300)


@pytest.fixture
def net() -> Iterator[Lab]:
    with lab() as made:
        yield made


def run_in(netns: str, scenario: Callable[[], Awaitable[T]]) -> T:
    """Run `scenario` with its worker threads (and so its netlink sockets) in `netns`."""
    with inside(netns):
        return anyio.run(scenario)


def counters_in(net: Lab) -> Counters:
    """Counters whose libnftables context lives in the lab's server namespace (it opens its socket
    when created): the table it makes vanishes with the namespace, whatever happens."""
    with inside(net.server):
        return Counters(unique_name("pmc"))


def nft_counters(net: Lab, table: str) -> dict[str, tuple[int, int, int]]:
    """name -> (handle, packets, bytes) as the nft command lists them."""
    listing = json.loads(net.nft("-j", "-a", "list", "counters", "table", "inet", table).stdout)
    return {
        c["name"]: (c["handle"], c["packets"], c["bytes"])
        for c in (o["counter"] for o in listing["nftables"] if "counter" in o)
    }


def send_udp(net: Lab, port: int, count: int, payload: int = 100) -> None:
    receiver = net.udp(net.server)
    receiver.bind(("198.18.0.1", port))
    sender = net.udp(net.client)
    for _ in range(count):
        sender.sendto(b"x" * payload, ("198.18.0.1", port))
    receiver.close()
    sender.close()


def test_quick_read_matches_nft_listing_and_per_port_read(net: Lab) -> None:
    counters = counters_in(net)
    table = counters.table

    async def build() -> None:
        await counters.build({port: None for port in PORTS})
        await counters.read()  # full check: the layout is fingerprinted from here on

    run_in(net.server, build)
    send_udp(net, PORTS[7], 5)
    send_udp(net, PORTS[-1], 3, payload=50)

    async def read() -> tuple[Any, Any]:
        return await counters.read(), await counters.read_ports([PORTS[7], PORTS[-1], 9])

    view, few = run_in(net.server, read)
    assert view is not None and few is not None and not view.problems
    listed = nft_counters(net, table)
    assert len(view.ports) == len(PORTS) and not view.stray
    for port, reading in view.ports.items():
        for kind in ("rx", "tx"):
            got = getattr(reading, kind)
            assert (got.handle, got.packets, got.bytes) == listed[f"{kind}_{port}"]
            assert got.table_handle == view.handle
    assert view.ports[PORTS[7]].rx.bytes == 5 * 128 and view.ports[PORTS[-1]].rx.bytes == 3 * 78
    assert set(few.ports) == {PORTS[7], PORTS[-1]}
    assert few.ports[PORTS[7]] == view.ports[PORTS[7]]
    net.nft("delete", "table", "inet", table)


@pytest.mark.parametrize(
    "damage",
    [
        ("flush", "chain", "inet", "{t}", "input"),
        ("delete", "chain", "inet", "{t}", "output"),
        ("add", "rule", "inet", "{t}", "input", "counter"),
    ],
)
def test_a_changed_layout_is_noticed_at_the_next_read(net: Lab, damage: tuple[str, ...]) -> None:
    counters = counters_in(net)
    table = counters.table

    async def prepare() -> Any:
        await counters.build({port: None for port in PORTS[:10]})
        return await counters.read()

    assert not run_in(net.server, prepare).problems
    args = [part.format(t=table) for part in damage]
    if args[:2] == ["delete", "chain"]:
        net.nft("flush", "chain", "inet", table, args[-1])
    net.nft(*args)
    view = run_in(net.server, counters.read)
    assert view is not None and view.problems
    net.nft("delete", "table", "inet", table)


def test_install_is_all_or_nothing_and_names_the_refused_step(net: Lab) -> None:
    counters = counters_in(net)
    table = counters.table
    port = PORTS[0]

    async def scenario() -> None:
        await counters.build({})
        net.nft("add", "counter", "inet", table, f"tx_{port}")  # a leftover half of a port
        with pytest.raises(NftError, match=f"create counter tx_{port}: File exists"):
            await counters.install(port, Quota(1000, 0))
        view = await counters.read()
        assert view is not None and port not in view.ports and port in view.stray
        listing = net.nft("list", "table", "inet", table).stdout
        assert f"rx_{port}" not in listing and f"q_{port}" not in listing

    run_in(net.server, scenario)
    net.nft("delete", "table", "inet", table)


def test_quota_install_replace_and_lift_over_netlink(net: Lab) -> None:
    counters = counters_in(net)
    table = counters.table
    port = PORTS[1]

    async def scenario() -> list[Any]:
        await counters.build({})
        await counters.install(port)
        seen = []
        for quota in (Quota(5000, 100), Quota(9000, 200), None):
            await counters.enforce(port, quota)
            view = await counters.read_ports([port])
            assert view is not None
            seen.append(view.ports[port].quota)
        await counters.remove(port)
        view = await counters.read()
        assert view is not None and not view.ports and not view.stray
        return seen

    first, second, lifted = run_in(net.server, scenario)
    assert (first.limit, first.used, second.limit, second.used, lifted) == (
        5000,
        100,
        9000,
        200,
        None,
    )
    net.nft("delete", "table", "inet", table)


def test_missing_table_reads_as_none(net: Lab) -> None:
    counters = counters_in(net)

    async def scenario() -> tuple[Any, Any]:
        return await counters.read(), await counters.read_ports([PORTS[0]])

    assert run_in(net.server, scenario) == (None, None)


EXPERIMENTAL_PROTO = 253  # RFC 3692: an IP protocol no stack handles, so raw sockets carry it


def test_only_tcp_and_udp_reach_the_counters(net: Lab) -> None:
    """The first rule of each hook ends the chain for other protocols; without it the rules after
    would read a port from any transport header. A packet of another protocol whose first bytes
    look like ports of ours arrives and leaves uncounted; one UDP datagram is counted exactly."""
    counters = counters_in(net)
    table = counters.table
    run_in(net.server, lambda: counters.build({port: None for port in PORTS[:2]}))
    looks_like_ports = PORTS[0].to_bytes(2, "big") + PORTS[1].to_bytes(2, "big") + b"x" * 60
    with inside(net.server):
        server = socket.socket(socket.AF_INET, socket.SOCK_RAW, EXPERIMENTAL_PROTO)
    with inside(net.client):
        client = socket.socket(socket.AF_INET, socket.SOCK_RAW, EXPERIMENTAL_PROTO)
    with server, client:
        server.settimeout(5)
        client.sendto(looks_like_ports, (SERVER_V4, 0))
        assert server.recv(2048)[20:] == looks_like_ports  # it went through the input hook
        server.sendto(looks_like_ports, (CLIENT_V4, 0))  # and this through the output hook
    send_udp(net, PORTS[1], 1)
    view = run_in(net.server, counters.read)
    assert view is not None and not view.problems
    counted = {
        port: (r.rx.packets, r.rx.bytes, r.tx.packets, r.tx.bytes) for port, r in view.ports.items()
    }
    assert counted == {PORTS[0]: (0, 0, 0, 0), PORTS[1]: (1, 128, 0, 0)}
    net.nft("delete", "table", "inet", table)


def test_only_our_table_is_changed(net: Lab) -> None:
    counters = counters_in(net)
    ours, theirs = counters.table, unique_name("other")
    net.nft("add", "table", "inet", theirs)
    net.nft("add", "counter", "inet", theirs, f"rx_{PORTS[2]}")

    async def scenario() -> None:
        await counters.build({})
        await counters.install(PORTS[2])
        await counters.remove(PORTS[2])

    run_in(net.server, scenario)
    assert f"rx_{PORTS[2]}" in net.nft("list", "table", "inet", theirs).stdout
    for table in (ours, theirs):
        net.nft("delete", "table", "inet", table)


ports = st.sets(st.integers(1, 60))


@given(ports, ports, ports, ports)
def test_port_gaps_split_every_port_by_where_it_is_missing_or_unowned(
    wanted: set[int], counted: set[int], rx: set[int], tx: set[int]
) -> None:
    reading = PortReading(Reading(1, 1, 0, 0), Reading(1, 2, 0, 0))
    view = TableView(handle=1, ports=dict.fromkeys(counted, reading))
    elements = {"rx": {p: f"rx_{p}" for p in rx}, "tx": {p: f"tx_{p}" for p in tx}}
    gaps = port_gaps(wanted, view, elements)
    for where, present in (("counters", counted), ("map rx", rx), ("map tx", tx)):
        missing, unowned = gaps[where]
        assert missing | (present & wanted) == wanted and not missing & present
        assert unowned | (present & wanted) == present and not unowned & wanted
    assert set(port_gaps(wanted, view)) == {"counters"}
