"""What the poll loop hands to history and fleet reports: traffic per key since the last save.

Sinks are told about usage in three steps around each save of the state file, so that what they
keep agrees exactly with the state even when the daemon is killed in between:
`stage(g)` before the state with generation g is written, `commit(g)` after; at start,
`recover(g)` undoes whatever was staged for a generation the state file never reached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


class SinkError(Exception):
    """A sink could not stage usage (disk full, database locked); the save is refused.

    `disk_full`: the file system is full (ENOSPC, EDQUOT, SQLITE_FULL), the one failure answered
    507; any other is answered 503."""

    def __init__(self, message: str, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


@dataclass(frozen=True, slots=True)
class UsageDelta:
    key_id: str
    name: str
    uuid: str
    port: int
    epoch: int  # how many resets the key had: usage of one epoch sums to its current total
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0

    def plus(self, rx_bytes: int, tx_bytes: int, rx_packets: int, tx_packets: int) -> UsageDelta:
        return UsageDelta(
            self.key_id,
            self.name,
            self.uuid,
            self.port,
            self.epoch,
            self.rx_bytes + rx_bytes,
            self.tx_bytes + tx_bytes,
            self.rx_packets + rx_packets,
            self.tx_packets + tx_packets,
        )


class UsageSink(Protocol):
    def recover(self, committed: int) -> None: ...

    def stage(self, generation: int, at: datetime, deltas: Sequence[UsageDelta]) -> None: ...

    def commit(self, generation: int) -> None: ...

    def rollback(self, generation: int) -> None: ...
