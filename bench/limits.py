"""Speed, connection and device limits at 10,000 keys (README "Speed, connection and device
limits"), 1,000 of which have all three limits (1 Gbit/s, 1,000 connections, 100 addresses:
limits that do not bind here, so what is measured is their cost), by the CPU-cost method
(bench/cpucost.py, README "Data path cost").

- Data path: UDP datagrams of 1,400 bytes at a fixed rate to an unlimited key (the last port)
  of that table against no table, each in a lab of its own built once, rounds alternating: CPU
  time per GB, their ratio (target <= 1.03, as bench/datapath.py).
- Cost per packet of a limited key: 64-byte UDP datagrams at a fixed rate to a limited and to
  an unlimited key of the same table, alternating: the difference in CPU time per packet.
- Applying a limit change at 10,000 keys: `Counters.guard` replacing a key's speed, and its
  connection and address limits, timed in the server namespace (target <= 5 ms), and the first
  reading after a change (which checks the changed layout in full).
Usage: .venv/bin/python -m bench.limits [--quick]
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from dataclasses import dataclass

from bench.common import PORT_RANGE, append_results, interruptible, median, parse_quick, print_table
from bench.cpucost import (
    Setup,
    Traffic,
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
from bench.datapath import LARGE, NONE, SMALL, TARGET_RATIO
from tests.conftest import REPO
from tests.netlab import Lab, lab, unique_name

FREE, LIMITED = "unlimited key", "limited key"
# Builds the table the daemon builds: every port counted, the first `limited` ports guarded.
BUILD = """
import sys, anyio
from daemon.counters import Counters
from daemon.limits import kernel_guard
table, first, last, limited = sys.argv[1], *map(int, sys.argv[2:5])
ports = range(first, last + 1)
guard = kernel_guard(10**9, 1000, 100, 300)
anyio.run(Counters(table).build, dict.fromkeys(ports), {p: guard for p in ports[:limited]})
"""
# Times guard changes of one port and the reading after one; prints JSON (milliseconds).
APPLY = """
import json, sys, time, anyio
from daemon.counters import Counters
from daemon.limits import kernel_guard
table, port, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def main():
    c = Counters(table)
    await c.read()
    await c.read()
    speed, guard, reread = [], [], []
    conns, ips = 1000, 100
    for n in range(rounds):
        rate = 10**9 - 8000 * ((n + 1) % 2)
        t = time.perf_counter()
        await c.guard(port, kernel_guard(rate, conns, ips, 300))
        speed.append((time.perf_counter() - t) * 1e3)
        conns, ips = (999, 99) if conns == 1000 else (1000, 100)
        t = time.perf_counter()
        await c.guard(port, kernel_guard(rate, conns, ips, 300))
        guard.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        await c.read()
        reread.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"speed": speed, "guard": guard, "reread": reread}))
anyio.run(main)
"""


@dataclass(frozen=True)
class Plan:
    ports: int
    limited: int
    rounds: int
    applies: int
    large: Traffic
    small: Traffic


FULL = Plan(10000, 1000, 10, 20, Traffic(LARGE, 60000, 3), Traffic(SMALL, 100000, 3))
QUICK = Plan(1000, 100, 2, 10, Traffic(LARGE, 60000, 1), Traffic(SMALL, 100000, 1))


def in_namespace(net: Lab, script: str, *args: object) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", net.server, sys.executable, "-c", script, *map(str, args)],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return done.stdout


@dataclass
class Found:
    """The rounds of each comparison and the timed limit changes (milliseconds)."""

    large: dict[str, Setup]
    small: dict[str, Setup]
    applied: dict[str, list[float]]


def measure(plan: Plan) -> Found:
    ports = range(PORT_RANGE[0], PORT_RANGE[0] + plan.ports)
    free, limited = ports[-1], ports[0]
    with contextlib.ExitStack() as stack:
        group = stack.enter_context(cpu_group())
        blast = stack.enter_context(blaster())
        bare = stack.enter_context(lab())
        net = stack.enter_context(lab())
        table = unique_name("pmbl")
        in_namespace(net, BUILD, table, ports[0], ports[-1], plan.limited)
        large = alternate(
            group,
            {
                NONE: udp_at(bare, free, plan.large, blast, group),
                FREE: udp_at(net, free, plan.large, blast, group),
            },
            plan.rounds,
        )
        small = alternate(
            group,
            {
                FREE: udp_at(net, free, plan.small, blast, group),
                LIMITED: udp_at(net, limited, plan.small, blast, group),
            },
            plan.rounds,
        )
        applied = json.loads(in_namespace(net, APPLY, table, limited, plan.applies))
    return Found(large, small, applied)


def main(quick: bool = False) -> None:
    plan = QUICK if quick else FULL
    found = measure(plan)
    ratios = paired(found.large[FREE].rounds, found.large[NONE].rounds, "own", gigabytes, ratio)
    extra = paired(
        found.small[LIMITED].rounds, found.small[FREE].rounds, "own", packets, nanoseconds_more
    )
    per_gb = {s: per_unit(found.large[s].rounds, "own", gigabytes) for s in (NONE, FREE)}
    per_packet = {s: per_unit(found.small[s].rounds, "own", packets) for s in (FREE, LIMITED)}
    rows: list[list[str]] = [
        [f"UDP {LARGE} B, no table: own CPU s per GB", spread(per_gb[NONE], ".3f")],
        [f"UDP {LARGE} B, unlimited key: own CPU s per GB", spread(per_gb[FREE], ".3f")],
        ["  ratio to no table, paired rounds", spread(ratios, ".3f")],
        [
            f"UDP {SMALL} B, unlimited key: own CPU ns per packet",
            spread([c * 1e9 for c in per_packet[FREE]], ".0f"),
        ],
        [
            f"UDP {SMALL} B, limited key: own CPU ns per packet",
            spread([c * 1e9 for c in per_packet[LIMITED]], ".0f"),
        ],
        ["  limited - unlimited, paired rounds (ns per packet)", spread(extra, ".0f")],
        ["apply a speed change (ms)", spread(found.applied["speed"], ".2f")],
        ["apply a connection/address change (ms)", spread(found.applied["guard"], ".2f")],
        ["first reading after a change (ms)", spread(found.applied["reread"], ".1f")],
    ]
    lost = sum(
        r.work.lost for s in (*found.large.values(), *found.small.values()) for r in s.rounds
    )
    print_table(
        f"limits: {plan.ports} keys, {plan.limited} with speed, connection and address limits, "
        f"{plan.rounds} alternating rounds x {plan.large.seconds} s at "
        f"{plan.large.rate} / {plan.small.rate} packets/s ({lost} packets lost)",
        ["what", "median (min-max)"],
        rows,
    )
    print(
        f"unlimited key / no table, CPU per GB: {median(ratios):.3f} (target <= {TARGET_RATIO}): "
        f"{'met' if median(ratios) <= TARGET_RATIO else 'NOT met'}"
    )
    print(f"cost per packet of a limited key: {median(extra):.0f} ns per datagram")
    change = median(found.applied["speed"])
    print(
        f"a speed change at {plan.ports} keys: {change:.2f} ms (target <= 5 ms): "
        f"{'met' if change <= 5 else 'NOT met'}"
    )
    append_results(
        "limits, CPU cost",
        [
            (
                f"{plan.ports} keys, {plan.limited} limited",
                "; ".join(f"{r[0].strip()}: {r[1]}" for r in rows)
                + f"; {plan.rounds} rounds x {plan.large.seconds} s",
            )
        ],
        quick,
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
