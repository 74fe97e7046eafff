"""Why a poll at 30,000 keys costs what it costs: the kernel's dump of a table's named objects.

portmeter reads every counter with ONE netlink dump of the table's objects (two per key, four
with a data limit). nf_tables answers a dump in skbs of at most 32 KB (about 300 objects), and
each continuation walks the table's object list from its first entry to where the last one
stopped, so the kernel's work grows with the square of the objects. This bench builds tables of
plain counters of each size in a namespace of its own and reports the system CPU time of one
dump, taken by the daemon's own reader (daemon/nft/netlink.py), and how many answers it came in.
Usage: .venv/bin/python -m bench.objects_dump [--quick]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

from bench.common import append_results, interruptible, median, parse_quick, print_table
from tests.netlab import sh, unique_name

FULL = [10000, 20000, 40000, 60000, 120000]  # objects: 5,000 .. 30,000 keys (60,000 with limits)
QUICK = [2000, 8000]
DUMPS = 5
TABLE = "pmbdump"


def measure_here(objects: int) -> dict[str, float]:
    """Inside the namespace: build the table, time DUMPS dumps, remove it."""
    from daemon.nft import codec as nl
    from daemon.nft.netlink import RECEIVE_BUFFER, Netlink

    lines = [f"table inet {TABLE} {{"]
    lines += [f"counter c_{n} {{}}" for n in range(objects)]
    lines.append("}")
    subprocess.run(["nft", "-f", "-"], input="\n".join(lines), text=True, check=True)
    try:
        link = Netlink()
        request = nl.attr(nl.OBJ_TABLE, nl.text(TABLE))
        data = link.dump(nl.GETOBJ, request)  # warm
        system: list[float] = []
        user: list[float] = []
        for _ in range(DUMPS):
            before = resource.getrusage(resource.RUSAGE_THREAD)
            link.dump(nl.GETOBJ, request)
            after = resource.getrusage(resource.RUSAGE_THREAD)
            system.append((after.ru_stime - before.ru_stime) * 1000)
            user.append((after.ru_utime - before.ru_utime) * 1000)
        return {
            "bytes": len(data),
            "answers": -(-len(data) // min(RECEIVE_BUFFER, 32768)),
            "system_ms": median(system),
            "user_ms": median(user),
        }
    finally:
        subprocess.run(["nft", "delete", "table", "inet", TABLE], check=True)


def measure(objects: int) -> dict[str, float]:
    """One size, in a namespace made for it (removed afterwards)."""
    namespace = unique_name("pmbd")
    sh("ip", "netns", "add", namespace)
    try:
        code = f"import json, bench.objects_dump as b; print(json.dumps(b.measure_here({objects})))"
        done = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
        )
        figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
        return figures
    finally:
        sh("ip", "netns", "del", namespace)


def main(quick: bool = False) -> None:
    results = [(n, measure(n)) for n in (QUICK if quick else FULL)]
    print_table(
        "one dump of a table's named objects (the poll's kernel read): CPU time, median of "
        f"{DUMPS}",
        ["objects", "dump MB", "answers of <= 32 KB", "system ms", "user ms"],
        [
            [
                n,
                f"{r['bytes'] / 1e6:.1f}",
                r["answers"],
                f"{r['system_ms']:.1f}",
                f"{r['user_ms']:.1f}",
            ]
            for n, r in results
        ],
    )
    append_results(
        "objects dump (kernel)",
        [
            (f"{n} objects", f"system {r['system_ms']:.1f} ms, user {r['user_ms']:.1f} ms")
            for n, r in results
        ],
        quick,
    )


if __name__ == "__main__":
    interruptible()
    main(parse_quick(__doc__))
