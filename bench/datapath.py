"""Data-path cost by the CPU-cost method (bench/cpucost.py, README "Data path cost").

Three setups, each in a lab of its own (two namespaces joined by veth), built once:
- no table;
- a trivial table: one `counter` rule per hook (input and output), the cost of having a hooked
  chain at all, which is not portmeter's;
- a portmeter table with 30,000 keys on ports 20001-50000, built by daemon.counters.Counters.

bench/blast.c sends UDP from the client namespace to the highest port (the last element added
to the portmeter maps) at a fixed packet rate every setup carries without loss, in alternating
rounds: 1,400-byte datagrams (CPU time per GB of payload: portmeter against no table, target
ratio <= 1.03) and 64-byte datagrams (CPU time per packet: portmeter minus the trivial table,
target <= 200 ns). On this noisy 2-core machine a paired round spreads by several hundred
nanoseconds per packet, so the small-packet rounds are then run again with the input rules of the
trivial and the portmeter table repeated 8 times: the difference, divided by 8, is the cost of
portmeter's rules above the trivial rule, with 8 times the signal against the same noise.
Usage: .venv/bin/python -m bench.datapath [--quick]
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.common import append_results, interruptible, median, parse_quick, print_table
from bench.cpucost import (
    Round,
    Setup,
    Traffic,
    Work,
    alternate,
    blaster,
    cpu_group,
    gigabytes,
    nanoseconds_more,
    packets,
    paired,
    per_unit,
    ratio,
    spread,
    udp_at,
)
from tests.conftest import REPO
from tests.netlab import Lab, lab, unique_name

NONE, TRIVIAL, PORTMETER = "no table", "trivial counter", "portmeter"
SETUPS = (NONE, TRIVIAL, PORTMETER)
FIRST_PORT = 20001
LARGE, SMALL = 1400, 64  # UDP payload bytes
# The portmeter table, built the way the daemon builds it; runs inside the server namespace.
BUILD = (
    "import sys, anyio; from daemon.counters import Counters; "
    "ports = range(int(sys.argv[2]), int(sys.argv[3]) + 1); "
    "anyio.run(Counters(sys.argv[1]).build, dict.fromkeys(ports))"
)
CLOCKS = ("own", "system")
TARGET_RATIO, TARGET_NS = 1.03, 200.0
COPIES = 8  # the input rules repeated, to see their own cost above the noise


@dataclass(frozen=True)
class Plan:
    ports: int
    rounds: int
    large: Traffic
    small: Traffic


FULL = Plan(30000, 12, Traffic(LARGE, 60000, 3), Traffic(SMALL, 100000, 3))
QUICK = Plan(1000, 2, Traffic(LARGE, 60000, 1), Traffic(SMALL, 100000, 1))


def trivial_script(table: str) -> str:
    """An nft script: a table whose input and output chains each hold one `counter` rule."""
    chains = "".join(
        f"  chain {hook} {{\n    type filter hook {hook} priority mangle; policy accept;\n"
        "    counter\n  }\n"
        for hook in ("input", "output")
    )
    return f"table inet {table} {{\n{chains}}}\n"


def install(setup: str, net: Lab, ports: range) -> str | None:
    """Install the setup's table in the server namespace; its name (None for no table)."""
    if setup == NONE:
        return None
    table = unique_name("pmbd")
    if setup == PORTMETER:
        command = [sys.executable, "-c", BUILD, table, str(ports[0]), str(ports[-1])]
        subprocess.run(
            ["ip", "netns", "exec", net.server, *command], cwd=REPO, check=True, timeout=900
        )
    else:
        load(net, trivial_script(table))
    return table


def load(net: Lab, script: str, *options: str) -> None:
    """Feed an nft script (JSON with option -j) to nft in the server namespace."""
    command = ["ip", "netns", "exec", net.server, "nft", *options, "-f", "-"]
    subprocess.run(command, input=script, text=True, check=True)


def counted_bytes(net: Lab, table: str, port: int) -> int:
    """Bytes the portmeter table counted for `port` (rx): proof the traffic went through it."""
    out = json.loads(net.nft("-j", "list", "counter", "inet", table, f"rx_{port}").stdout)
    return next(int(o["counter"]["bytes"]) for o in out["nftables"] if "counter" in o)


def repeat_input_rules(net: Lab, table: str, copies: int) -> None:
    """Append the input chain's rules to it again until it holds `copies` of them. For a packet to
    an unlimited key none of them ends the chain, so each copy costs what the rules cost once."""
    listing = json.loads(net.nft("-j", "list", "chain", "inet", table, "input").stdout)
    rules = [o["rule"] for o in listing["nftables"] if "rule" in o]
    again = [
        {"add": {"rule": {"family": "inet", "table": table, "chain": "input", "expr": r["expr"]}}}
        for r in rules
    ]
    load(net, json.dumps({"nftables": again * (copies - 1)}), "-j")


@dataclass
class Found:
    """The rounds of each comparison, and what the portmeter table counted."""

    large: dict[str, Setup]
    small: dict[str, Setup]
    repeated: dict[str, Setup]
    counted: int


def measure(plan: Plan) -> Found:
    """Large-packet rounds and small-packet rounds of every setup; then small-packet rounds of the
    trivial and the portmeter table with their input rules repeated."""
    ports = range(FIRST_PORT, FIRST_PORT + plan.ports)
    port = ports[-1]
    with contextlib.ExitStack() as stack:
        group = stack.enter_context(cpu_group())
        blast = stack.enter_context(blaster())
        labs: dict[str, tuple[Lab, str | None]] = {}
        for setup in SETUPS:
            net = stack.enter_context(lab())
            labs[setup] = (net, install(setup, net, ports))

        def sender(shape: Traffic, *setups: str) -> dict[str, Callable[[], Work]]:
            return {setup: udp_at(labs[setup][0], port, shape, blast, group) for setup in setups}

        large = alternate(group, sender(plan.large, *SETUPS), plan.rounds)
        small = alternate(group, sender(plan.small, *SETUPS), plan.rounds)
        net, table = labs[PORTMETER]
        assert table is not None
        counted = counted_bytes(net, table, port)
        for setup in (TRIVIAL, PORTMETER):
            net, table = labs[setup]
            assert table is not None
            repeat_input_rules(net, table, COPIES)
        repeated = alternate(group, sender(plan.small, TRIVIAL, PORTMETER), plan.rounds)
    return Found(large, small, repeated, counted)


def lost(rounds: list[Round]) -> str:
    """Packets lost over all rounds, as a share of those sent."""
    gone = sum(r.work.lost for r in rounds)
    return f"{gone / (gone + sum(r.work.packets for r in rounds)):.2%}"


def cost_rows(
    found: dict[str, Setup],
    setups: Sequence[str],
    unit: Callable[[Work], float],
    scale: float,
    fmt: str,
) -> list[list[str]]:
    """Per setup: the cost per unit on both clocks (median and range over rounds), and loss."""
    return [
        [
            setup,
            *(
                spread([c * scale for c in per_unit(found[setup].rounds, clock, unit)], fmt)
                for clock in CLOCKS
            ),
            lost(found[setup].rounds),
        ]
        for setup in setups
    ]


def main(quick: bool = False) -> None:
    plan = QUICK if quick else FULL
    found = measure(plan)
    assert found.counted > 0, "portmeter counted nothing"
    title = f"{plan.rounds} alternating rounds x {plan.large.seconds} s, to port "
    title += f"{FIRST_PORT + plan.ports - 1} (the last of {plan.ports} keys)"
    print_table(
        f"data path, UDP {LARGE} B at {plan.large.rate} packets/s: CPU s per GB; {title}",
        ["setup", "own CPU", "all CPU (/proc/stat)", "lost"],
        cost_rows(found.large, SETUPS, gigabytes, 1.0, ".3f"),
    )
    print_table(
        f"data path, UDP {SMALL} B at {plan.small.rate} packets/s: CPU ns per packet; {title}",
        ["setup", "own CPU", "all CPU (/proc/stat)", "lost"],
        cost_rows(found.small, SETUPS, packets, 1e9, ".0f"),
    )
    print_table(
        f"the same, input rules repeated {COPIES} times",
        ["setup", "own CPU", "all CPU (/proc/stat)", "lost"],
        cost_rows(found.repeated, (TRIVIAL, PORTMETER), packets, 1e9, ".0f"),
    )
    figures: dict[str, str] = {}
    for clock in CLOCKS:
        ratios = paired(
            found.large[PORTMETER].rounds, found.large[NONE].rounds, clock, gigabytes, ratio
        )
        extra = marginal(found.small, PORTMETER, TRIVIAL, clock)
        hook = marginal(found.small, TRIVIAL, NONE, clock)
        rules = [n / COPIES for n in marginal(found.repeated, PORTMETER, TRIVIAL, clock)]
        figures[clock] = (
            f"{LARGE} B, portmeter / no table per GB {spread(ratios, '.3f')}; "
            f"{SMALL} B, portmeter - trivial {spread(extra, '.0f')} ns/packet, "
            f"trivial - no table {spread(hook, '.0f')} ns/packet, "
            f"portmeter's rules - trivial rule, from {COPIES} copies, {spread(rules, '.0f')} ns"
        )
        verdicts = (
            f"ratio {'met' if median(ratios) <= TARGET_RATIO else 'NOT met'}, "
            f"marginal {'met' if median(extra) <= TARGET_NS else 'NOT met'}"
        )
        print(f"{clock} CPU, median (range) of paired rounds: {figures[clock]} ({verdicts})")
    append_results(
        "data path, CPU cost",
        [
            (
                f"{plan.ports} keys",
                "; ".join(f"{clock} CPU: {figures[clock]}" for clock in CLOCKS)
                + f"; {plan.rounds} rounds x {plan.large.seconds} s",
            )
        ],
        quick,
    )


def marginal(found: dict[str, Setup], setup: str, base: str, clock: str) -> list[float]:
    """Nanoseconds per packet `setup` costs more than `base`, round pair by round pair."""
    return paired(found[setup].rounds, found[base].rounds, clock, packets, nanoseconds_more)


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
