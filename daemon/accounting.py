"""Kernel readings -> deltas -> cumulative totals. Pure.

A kernel counter is identified by the handle of its table and its own handle: both change when
the table or the counter is recreated (reboot, `nft flush ruleset`, a reinstall), and the new
counter starts from zero. Any reading that is not a continuation of the previous one (other
identity, or a value that went backwards) is a fresh start: its whole value is new traffic.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reading:
    """One kernel counter as read: who it is and what it holds."""

    table_handle: int
    handle: int
    packets: int
    bytes: int

    def continues(self, previous: Reading) -> bool:
        return (
            self.table_handle == previous.table_handle
            and self.handle == previous.handle
            and self.packets >= previous.packets
            and self.bytes >= previous.bytes
        )


@dataclass(frozen=True, slots=True)
class Usage:
    packets: int = 0
    bytes: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.packets + other.packets, self.bytes + other.bytes)


ZERO = Usage()


def delta(previous: Reading | None, current: Reading) -> Usage:
    """Traffic counted between two readings of the same counter; never negative."""
    if previous is None or not current.continues(previous):
        return Usage(current.packets, current.bytes)
    return Usage(current.packets - previous.packets, current.bytes - previous.bytes)


@dataclass(frozen=True, slots=True)
class Account:
    """Cumulative usage of one direction of one key, and the reading it is based on."""

    total: Usage = ZERO
    reading: Reading | None = None

    def advance(self, current: Reading) -> Account:
        return Account(self.total + delta(self.reading, current), current)

    def reset(self) -> Account:
        """Zero the total; the current reading becomes the baseline for what follows."""
        return Account(ZERO, self.reading)
