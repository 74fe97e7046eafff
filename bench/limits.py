"""Speed, connection and device limits at 10,000 keys (README "Speed, connection and device
limits"), 1,000 of which have all three limits (1 Gbit/s, 1,000 connections, 100 addresses:
limits that do not bind here, so what is measured is their cost).

- Data path: iperf3 TCP through an unlimited key (the last port) of that table against no
  table, each in a lab of its own built once, rounds alternating (target >= 97 %, judged on the
  best rounds as bench/datapath.py does).
- Cost per packet of a limited key: 64-byte UDP datagrams at full speed through a limited and
  an unlimited key of the same table, the difference in nanoseconds per received datagram.
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import (
    PORT_RANGE,
    append_results,
    interruptible,
    median,
    parse_quick,
    print_table,
    scratch,
)
from bench.datapath import iperf, iperf_server
from tests.conftest import REPO
from tests.netlab import Lab, lab, unique_name

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
    seconds: int


FULL = Plan(ports=10000, limited=1000, rounds=5, seconds=3)
QUICK = Plan(ports=1000, limited=100, rounds=1, seconds=1)


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


def pps(result: dict[str, float], seconds: int) -> float:
    """Datagrams received per second."""
    return (result["packets"] - result["lost_packets"]) / seconds


def measure(plan: Plan, workdir: Path) -> dict[str, list[float]]:
    ports = range(PORT_RANGE[0], PORT_RANGE[0] + plan.ports)
    free, limited = ports[-1], ports[0]
    found: dict[str, list[float]] = {"none": [], "limits": [], "free pps": [], "limited pps": []}
    with contextlib.ExitStack() as stack:
        bare = stack.enter_context(lab())
        net = stack.enter_context(lab())
        table = unique_name("pmbl")
        in_namespace(net, BUILD, table, ports[0], ports[-1], plan.limited)
        for where, port in ((bare, free), (net, free), (net, limited)):
            stack.enter_context(iperf_server(where, port))
        for _ in range(plan.rounds):
            found["none"].append(iperf(bare, free, plan.seconds)["bits_per_second"] / 1e9)
            found["limits"].append(iperf(net, free, plan.seconds)["bits_per_second"] / 1e9)
            for port, name in ((free, "free pps"), (limited, "limited pps")):
                udp = iperf(net, port, plan.seconds, "-u", "-b", "0", "-l", "64")
                found[name].append(pps(udp, plan.seconds))
        applied = json.loads(in_namespace(net, APPLY, table, limited, max(plan.rounds * 4, 10)))
        found.update(applied)
    return found


def main(quick: bool = False) -> None:
    plan = QUICK if quick else FULL
    with scratch() as workdir:
        found = measure(plan, workdir)
    best = max(found["limits"]) / max(found["none"])
    ns = 1e9 / median(found["limited pps"]) - 1e9 / median(found["free pps"])
    rows: list[Sequence[object]] = [
        ["TCP, no table (Gbit/s)", f"{median(found['none']):.2f}", f"{max(found['none']):.2f}"],
        [
            f"TCP, unlimited key, {plan.limited} of {plan.ports} keys limited (Gbit/s)",
            f"{median(found['limits']):.2f}",
            f"{max(found['limits']):.2f}",
        ],
        [
            "UDP 64 B, unlimited key (kpps)",
            f"{median(found['free pps']) / 1e3:.0f}",
            f"{max(found['free pps']) / 1e3:.0f}",
        ],
        [
            "UDP 64 B, limited key (kpps)",
            f"{median(found['limited pps']) / 1e3:.0f}",
            f"{max(found['limited pps']) / 1e3:.0f}",
        ],
        [
            "apply a speed change (ms)",
            f"{median(found['speed']):.2f}",
            f"{min(found['speed']):.2f}",
        ],
        [
            "apply a connection/address change (ms)",
            f"{median(found['guard']):.2f}",
            f"{min(found['guard']):.2f}",
        ],
        [
            "first reading after a change (ms)",
            f"{median(found['reread']):.1f}",
            f"{min(found['reread']):.1f}",
        ],
    ]
    print_table(
        f"limits: {plan.ports} keys, {plan.limited} with speed, connection and address limits, "
        f"{plan.rounds} alternating rounds x {plan.seconds} s",
        ["what", "median", "best"],
        rows,
    )
    print(
        f"unlimited key, best rounds = {best:.1%} of no table (target >= 97%): "
        f"{'met' if best >= 0.97 else 'NOT met'}"
    )
    print(f"cost per packet of a limited key: {ns:.0f} ns per datagram")
    change = median(found["speed"])
    print(
        f"a speed change at {plan.ports} keys: {change:.2f} ms (target <= 5 ms): "
        f"{'met' if change <= 5 else 'NOT met'}"
    )
    append_results(
        "limits, iperf3",
        [
            (
                f"{plan.ports} keys, {plan.limited} limited",
                "; ".join(f"{r[0]}: median {r[1]}, best {r[2]}" for r in rows)
                + f"; unlimited key {best:.1%} of no table"
                + f"; {ns:.0f} ns per packet of a limited key",
            )
        ],
        quick,
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
