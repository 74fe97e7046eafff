"""Port allocation: pure functions over the range, the ports keys hold and the ports others hold.

No I/O here: the service asks the kernel which ports other processes have bound and passes them in,
so the rules (lowest free port, explicit requests, capacity) are testable as plain properties.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

RANGE_PATTERN = re.compile(r"^\s*(\d{1,5})\s*-\s*(\d{1,5})\s*$")


class PortUnavailable(Exception):
    """The requested port cannot be given to a key; the message says why."""


@dataclass(frozen=True, slots=True)
class PortRange:
    first: int
    last: int

    def __post_init__(self) -> None:
        if not 1 <= self.first <= self.last <= 65535:
            raise ValueError(
                f"port range {self.first}-{self.last} must satisfy 1 <= first <= last <= 65535"
            )

    @classmethod
    def parse(cls, text: str) -> PortRange:
        match = RANGE_PATTERN.match(text)
        if not match:
            raise ValueError(f"port range {text!r} must look like 10001-10100")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    @property
    def size(self) -> int:
        return self.last - self.first + 1


def lowest_free(
    port_range: PortRange, assigned: AbstractSet[int], busy: AbstractSet[int]
) -> int | None:
    """The lowest port of the range that no key holds and no other process has bound."""
    for port in range(port_range.first, port_range.last + 1):
        if port not in assigned and port not in busy:
            return port
    return None


def check_request(
    port_range: PortRange, port: int, assigned: AbstractSet[int], busy: AbstractSet[int]
) -> int:
    """Validate an explicitly requested port; raise PortUnavailable with the reason."""
    if port not in port_range:
        raise PortUnavailable(f"port {port} is outside the range {port_range}")
    if port in assigned:
        raise PortUnavailable(f"port {port} is already assigned to another key")
    if port in busy:
        raise PortUnavailable(f"port {port} is in use by another process on this host")
    return port


def allocate(
    port_range: PortRange,
    assigned: AbstractSet[int],
    busy: AbstractSet[int],
    requested: int | None = None,
) -> int:
    """The port for a new key: the requested one if valid, else the lowest free one."""
    if requested is not None:
        return check_request(port_range, requested, assigned, busy)
    port = lowest_free(port_range, assigned, busy)
    if port is None:
        in_use = sum(1 for p in busy - assigned if p in port_range)
        held = sum(1 for p in assigned if p in port_range)
        raise PortUnavailable(
            f"no free port in {port_range}: {held} held by keys, {in_use} in use by other processes"
        )
    return port


def problems(port_range: PortRange, assignments: Mapping[str, int]) -> list[str]:
    """Inconsistencies in a key -> port map: ports outside the range and ports held twice."""
    found = [
        f"key {key} holds port {port} outside the range {port_range}"
        for key, port in sorted(assignments.items())
        if port not in port_range
    ]
    counts = Counter(assignments.values())
    for port, count in sorted(counts.items()):
        if count > 1:
            holders = sorted(k for k, p in assignments.items() if p == port)
            found.append(f"port {port} is held by {count} keys: {', '.join(holders)}")
    return found


def available(port_range: PortRange, assigned: Iterable[int]) -> int:
    """How many more keys fit in the range."""
    return port_range.size - sum(1 for port in set(assigned) if port in port_range)
