"""daemon/nft/layout.py describes a key's guard chain once; its two encodings agree in the real
kernel: the chain libnftables builds from the JSON (a table build) holds the very expressions of
the chain sent as netlink messages (a change), with the same sets, counters and limits.

One difference is known and kept (this split changes no bytes): libnftables marks an address set
`dynamic` (NFT_SET_EVAL) because a rule updates it, the netlink message does not. Both sets take
the same kernel backend (a resizable hash: the only one with timeouts and O(1) lookups), and the
max_ips tests pass on either."""

from __future__ import annotations

import re

import anyio
import pytest

from daemon.counters import Counters
from daemon.limits import Guard
from daemon.nft.layout import guard_chain
from tests.netlab import Lab, inside, unique_name

PORT = 41777


DYNAMIC = "\t\tflags dynamic,timeout\n"


def listing(net: Lab, table: str, *what: str) -> str:
    """What nft lists, without the table's name and the rules' handles (the two tables differ
    in them: one made its objects in another order)."""
    out = net.nft(*what).stdout.replace(table, "TABLE")
    return re.sub(r"^(inet TABLE \S+)( \d+)+$", r"\1", out, flags=re.MULTILINE)


@pytest.mark.parametrize(
    "guard",
    [
        Guard(None, 3, None, 0),
        Guard(None, None, 2, 60),
        Guard(250_000, 4, 2, 300),
    ],
    ids=["connections", "addresses", "speed-connections-addresses"],
)
def test_a_guard_chain_built_from_json_equals_the_one_sent_over_netlink(
    net: Lab, guard: Guard
) -> None:
    with inside(net.server):
        built, changed = Counters(unique_name("pmjs")), Counters(unique_name("pmnl"))

    async def make() -> None:
        await built.build({PORT: None}, {PORT: guard})
        await changed.build({PORT: None})
        await changed.guard(PORT, guard)

    with inside(net.server):
        anyio.run(make)
    chain = guard_chain(PORT, guard).name
    seen: dict[str, tuple[str, list[str]]] = {}
    for counters in (built, changed):
        table = counters.table
        seen[table] = (
            listing(net, table, "--debug=netlink", "list", "chain", "inet", table, chain),
            # object by object: a change makes the chain before the speed's limits
            sorted(listing(net, table, "list", "table", "inet", table).split("\n\n")),
        )
    expressions, objects = seen[built.table]
    assert seen[changed.table] == (expressions, [o.replace(DYNAMIC, "") for o in objects])
    whole = "\n\n".join(objects)
    assert whole.count(DYNAMIC) == (2 if guard.addresses is not None else 0)
    assert expressions.count("[ immediate reg 0 drop ]") == (guard.addresses is not None)
    assert ("connlimit count" in expressions) == (guard.connections is not None)
    assert ("dynset update" in expressions) == (guard.addresses is not None)
    assert f"jump {chain}" in whole and (f"limit sr_{PORT}" in whole) == (guard.rate is not None)
