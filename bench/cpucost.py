"""The CPU-cost method for data-path benchmarks (README "Measured", "Data path cost").

Throughput rounds on a shared 2-core machine measure the other work running at the time as much
as the data path (best-of rounds of one setup spread over 80-112 %). Instead, traffic is offered
at a FIXED rate that every setup carries without loss, and what is measured is the CPU time the
machine spent for it, per gigabyte or per packet:

- system: all non-idle time of every CPU, from /proc/stat (user, nice, system, irq, softirq);
  it holds everything the traffic costs and everything else the machine ran meanwhile;
- own: the scheduler's exact run time (cpuacct, nanoseconds) of a cgroup holding the UDP
  sender and receiver, plus that of the ksoftirqd threads. Without IRQ time accounting (this
  kernel) the softirq work of a packet (veth, the nftables hooks, UDP/TCP receive) runs and is
  charged in the context of the task that raised it or in ksoftirqd, so this is the traffic's
  own cost with little of the other work on the machine in it.

Setups are measured in alternating rounds, so drift in the machine's load reaches all of them;
each round of a setup is paired with the round of the reference setup next to it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import median, scratch
from tests.netlab import SERVER_V4, Lab, unique_name

CPUACCT = Path("/sys/fs/cgroup/cpuacct")
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
# Fields of the "cpu" line of /proc/stat: user nice system idle iowait irq softirq ...
BUSY = (0, 1, 2, 5, 6)  # all but idle and iowait (steal is the hypervisor's, not ours)
BLAST_SOURCE = Path(__file__).with_name("blast.c")
IDLE = "300"  # milliseconds: the receiver stops this long after the last datagram


def busy_seconds() -> float:
    """Non-idle time of all CPUs since boot (user, nice, system, irq, softirq), in seconds."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return sum(int(fields[i]) for i in BUSY) / CLOCK_TICK


def softirq_threads() -> list[int]:
    """Pids of the ksoftirqd threads: softirq work deferred to them belongs to the traffic."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().startswith("ksoftirqd/"):
                    found.append(int(entry.name))
    return found


def run_ns(pid: int) -> int:
    """Total run time of a task in nanoseconds (/proc/PID/schedstat, first field)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return 0


@dataclass(frozen=True)
class CpuGroup:
    """A cpuacct cgroup of ours: what runs through `command` is counted, with ksoftirqd."""

    path: Path
    softirq: tuple[int, ...]

    def command(self, *args: str) -> list[str]:
        """`args` run inside the group: a shell moves itself in, then execs them (a preexec_fn
        would not be safe with threads); their children follow."""
        procs = self.path / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *args]

    def own_seconds(self) -> float:
        """Run time of the group's tasks (living and exited) and of ksoftirqd, in seconds."""
        group = int((self.path / "cpuacct.usage").read_text())
        return (group + sum(run_ns(pid) for pid in self.softirq)) / 1e9


@contextlib.contextmanager
def cpu_group() -> Iterator[CpuGroup]:
    """A fresh cpuacct cgroup, removed afterwards (once its processes have ended)."""
    path = CPUACCT / unique_name("pmcpu")
    path.mkdir()
    try:
        yield CpuGroup(path, tuple(softirq_threads()))
    finally:
        for attempt in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1 * min(attempt + 1, 5))


@dataclass(frozen=True)
class Traffic:
    """UDP datagrams of `length` payload bytes at `rate` packets per second for `seconds`."""

    length: int
    rate: int
    seconds: int


@dataclass(frozen=True)
class Work:
    """What one round carried: payload bytes and packets received, packets lost."""

    bytes: int
    packets: int
    lost: int


@dataclass(frozen=True)
class Round:
    """One measured round: CPU seconds (system-wide and own) and the work carried."""

    system: float
    own: float
    work: Work


@dataclass
class Setup:
    """Rounds of one setup."""

    rounds: list[Round] = field(default_factory=list)


def measure_round(group: CpuGroup, carry: Callable[[], Work]) -> Round:
    """Run `carry` once between two readings of both clocks."""
    system, own = busy_seconds(), group.own_seconds()
    work = carry()
    return Round(busy_seconds() - system, group.own_seconds() - own, work)


def alternate(
    group: CpuGroup, setups: Mapping[str, Callable[[], Work]], rounds: int
) -> dict[str, Setup]:
    """`rounds` rounds of every setup, in turn; the order within a round rotates, so no setup
    always follows the same one."""
    found = {name: Setup() for name in setups}
    names = list(setups)
    for n in range(rounds):
        shift = n % len(names)
        for name in names[shift:] + names[:shift]:
            found[name].rounds.append(measure_round(group, setups[name]))
    return found


# --- the traffic: bench/blast.c ---------------------------------------------------------


@contextlib.contextmanager
def blaster() -> Iterator[Path]:
    """bench/blast.c compiled into a scratch directory (removed afterwards): its path."""
    with scratch() as workdir:
        binary = workdir / "blast"
        subprocess.run(["cc", "-O2", "-o", str(binary), str(BLAST_SOURCE)], check=True)
        yield binary


def udp_at(net: Lab, port: int, shape: Traffic, blast: Path, group: CpuGroup) -> Callable[[], Work]:
    """A round: `shape` sent from the client namespace to `port` of the server namespace,
    sender and receiver in `group`."""

    def carry() -> Work:
        receiver = subprocess.Popen(
            group.command("ip", "netns", "exec", net.server, str(blast), "recv", str(port), IDLE),
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert receiver.stdout is not None
            if receiver.stdout.readline().strip() != "ready":
                raise RuntimeError("the receiver did not start")
            send = ("send", SERVER_V4, str(port), str(shape.length), str(shape.rate))
            sent = subprocess.run(
                group.command(
                    "ip", "netns", "exec", net.client, str(blast), *send, str(shape.seconds)
                ),
                check=True,
                capture_output=True,
                text=True,
                timeout=shape.seconds * 10 + 30,
            )
            out, _ = receiver.communicate(timeout=60)
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
        got, size = map(int, out.split())
        return Work(size, got, int(sent.stdout) - got)

    return carry


# --- figures ------------------------------------------------------------------------------


def per_unit(rounds: Sequence[Round], clock: str, unit: Callable[[Work], float]) -> list[float]:
    """CPU seconds per unit of work (`unit` of a round's work), round by round."""
    return [getattr(r, clock) / unit(r.work) for r in rounds]


def paired(
    setup: Sequence[Round],
    base: Sequence[Round],
    clock: str,
    unit: Callable[[Work], float],
    compare: Callable[[float, float], float],
) -> list[float]:
    """`compare(cost of setup, cost of base)` for each pair of rounds run side by side."""
    mine, theirs = per_unit(setup, clock, unit), per_unit(base, clock, unit)
    return [compare(a, b) for a, b in zip(mine, theirs, strict=True)]


def spread(values: Sequence[float], fmt: str) -> str:
    """`median (min-max)` of a sample, each value formatted with `fmt`."""
    return f"{format(median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def gigabytes(work: Work) -> float:
    return work.bytes / 1e9


def packets(work: Work) -> float:
    return float(work.packets)


def ratio(a: float, b: float) -> float:
    return a / b


def nanoseconds_more(a: float, b: float) -> float:
    return (a - b) * 1e9
